"""Where metrics go: wandb (offline by default), a console progress bar, and summary.json.

`MetricsLogger` is the one object a driver talks to:

    logger = MetricsLogger(cfg.logger, run_dir, config=plain_config_dict, total_steps=N, start_step=s)
    logger.log({"train/loss": 2.3, ...}, step)     # every backend
    logger.log_table("samples", columns, rows, step)  # a wandb Table, and run_dir/samples.jsonl
    logger.summary({"eval/loss_final": ...})        # summary.json in run_dir (+ wandb summary)
    logger.close()
"""
from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from models.checks import check_settings

if TYPE_CHECKING:
    from tqdm import tqdm

WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES: tuple[WandbMode, ...] = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "sparsetrain"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # run name (null: the job and its overrides, e.g. "rl algo=ppo task=dataset")
    samples_every: int = 0  # RL: every N steps a `samples` table of prompts, completions and rewards (0: never)
    console: bool = True  # tqdm progress bar on stderr
    summary_file: str = "summary.json"


class LoggerConfigError(ValueError):
    pass


def wandb_mode(mode: str) -> WandbMode:
    """`logger.mode` as one of wandb's modes; LoggerConfigError for anything else."""
    for known in WANDB_MODES:
        if mode == known:
            return known
    raise LoggerConfigError(f"logger.mode={mode!r}: expected offline, online or disabled")


def validate_logger_config(cfg: LoggerConfig) -> None:
    wandb_mode(cfg.mode)
    check_settings(LoggerConfigError, [
        (bool(cfg.summary_file), "logger.summary_file must name a file"),
        (cfg.samples_every >= 0, f"logger.samples_every={cfg.samples_every}: expected >= 0 (0: no samples table)"),
    ])


def run_name(job: str, overrides: list[str], limit: int = 120) -> str:
    """A readable run name from the job and its command-line overrides: paths shortened to their
    file name, hydra/logger settings left out. run_name("rl", ["algo=ppo", "task.path=/d/t.parquet"])
    == "rl algo=ppo task.path=t.parquet"."""
    parts = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~").startswith(("hydra", "logger")):
            continue
        if "/" in value and not value.startswith("["):
            value = value.rstrip("/").rsplit("/", 1)[-1]
        parts.append(f"{key}={value}" if _ else key)
    name = " ".join([job, *parts])
    return name if len(name) <= limit else name[:limit - 3] + "..."


class WandbBackend:
    """A wandb run in `run_dir/wandb`. A resumed job reuses the run id kept in run_dir."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict):
        os.environ["WANDB_MODE"] = cfg.mode  # the env var set by set_runtime_defaults must not win
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, tags=list(cfg.tags), name=cfg.name, config=config,
            dir=str(run_dir), mode=wandb_mode(cfg.mode), id=run_id, resume="allow", reinit="finish_previous",
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        header: list[str | int] = list(columns)
        self.run.log({name: wandb.Table(columns=header, data=rows)}, step=step)

    def summary(self, final: dict) -> None:
        for k, v in final.items():
            self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


class MetricsBackend(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None: ...

    def summary(self, final: dict) -> None: ...

    def close(self) -> None: ...


class ConsoleBackend:
    """tqdm bar over the job's steps, with the latest loss, reward, lr and throughput as its postfix.

    The bar starts when the steps it counts start (`start()`, or their first logged step), so the
    time before them (Ray start, the RL warm-up) does not enter its rate and ETA."""

    SHOWN = {"train/loss": "loss", "eval/loss": "eval", "reward/mean": "reward", "lr": "lr",
             "tokens_per_s": "tokens_per_s", "sparsity/density": "density"}

    def __init__(self, total_steps: int, start_step: int, desc: str = "train"):
        self.total, self.desc = total_steps, desc
        self.bar: tqdm | None = None
        self.last_step = start_step
        self.shown: dict[str, str] = {}

    def start(self) -> tqdm:
        """The progress bar, started now unless it runs already."""
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.last_step, desc=self.desc, unit="step",
                            dynamic_ncols=True)
        return self.bar

    def log(self, metrics: dict, step: int) -> None:
        for k, label in self.SHOWN.items():
            if k in metrics:
                self.shown[label] = f"{metrics[k]:.4g}"
        if step > self.last_step:
            self.start().update(step - self.last_step)
            self.last_step = step
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=False)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def summary(self, final: dict) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: str | Path, config: dict | None = None,
                 total_steps: int = 0, start_step: int = 0, progress: str = "train"):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backends: list[MetricsBackend] = []
        if cfg.wandb and cfg.mode != "disabled":
            self.backends.append(WandbBackend(cfg, self.run_dir, config or {}))
        if cfg.console:
            self.backends.append(ConsoleBackend(total_steps, start_step, progress))
        self.history: dict[str, list[tuple[int, float]]] = {}  # what summary() may draw on

    def start_progress(self, step: int | None = None) -> None:
        """The counted steps begin now, at `step` (the progress bar's clock starts)."""
        for b in self.backends:
            if isinstance(b, ConsoleBackend):
                if step is not None and b.bar is None:
                    b.last_step = step
                b.start()

    def plot(self, panels) -> Path | None:
        """run_dir/curves.png from everything logged (launch/curves.py)."""
        from launch.curves import plot_curves

        return plot_curves(self.history, panels, self.run_dir / "curves.png")

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        for k, v in clean.items():
            self.history.setdefault(k, []).append((step, v))
        for b in self.backends:
            b.log(clean, step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table (wandb.Table in wandb) at `step`; every row also appended to run_dir/<name>.jsonl."""
        with open(self.run_dir / f"{name}.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(columns, row)), default=str) + "\n")
        for b in self.backends:
            b.log_table(name, columns, rows, step)

    def summary(self, final: dict) -> Path:
        """Write `final` to run_dir/summary.json (and the wandb run's summary); returns the path."""
        path = self.run_dir / self.cfg.summary_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(final, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)
        for b in self.backends:
            b.summary(final)
        return path

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
