"""A job's console: the run directory printed first, everything printed kept in `<run dir>/<job>.log`,
and a short summary printed last.

The log is a tee of the driver's stdout and stderr, so it holds what the console showed: the
driver's lines, Ray's forwarded actor output and the final summary or error, without progress-bar
frames (tqdm redraws its bar with carriage returns; those writes are left out) and without ANSI
colours.
"""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Tee(io.TextIOBase):
    """Writes to `stream` and, minus progress-bar frames and colours, to `log`; `before_first`
    runs once, before the first write."""

    def __init__(self, stream, log, before_first):
        self.stream, self.log, self.before_first = stream, log, before_first

    def write(self, text: str) -> int:
        if text:
            self.before_first()
        self.stream.write(text)
        # a progress-bar frame starts with (or is made of) carriage returns; a CRLF line is kept
        frame = text.startswith("\r") or ("\r" in text and "\n" not in text)
        if not frame and not self.log.closed:
            self.log.write(ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if not self.log.closed:
            self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    # typeshed declares encoding a plain attribute; io.TextIOBase makes it read-only, so a property.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


class RunConsole:
    """`with RunConsole(run_dir, "rl.log") as console: ...; console.final(text)`.

    The run directory is the first line, written just before the job's first output: a job
    refused while it is still being planned (before it printed anything) prints only its error."""

    def __init__(self, run_dir: Path, log_name: str):
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / log_name
        self.log: TextIO | None = None
        self.saved: tuple[TextIO, TextIO] | None = None
        self.header_pending = True

    def __enter__(self) -> "RunConsole":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "a", buffering=1)
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.log, self._header), _Tee(sys.stderr, self.log, self._header)
        return self

    def _header(self) -> None:
        if self.header_pending:
            self.header_pending = False
            sys.stdout.write(f"run dir: {self.run_dir}\n")
            sys.stdout.flush()

    def final(self, text: str, error: bool = False) -> None:
        """The job's last words: the summary (stdout) or the one-line error / interruption (stderr)."""
        if error:
            self.header_pending = False
        print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = self.saved
            self.saved = None
        if self.log is not None and not self.log.closed:
            self.log.close()


def wandb_lines(run_dir: Path) -> list[str]:
    """Where the wandb run is, and how to upload it when it is an offline run."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*")) if (run_dir / "wandb").is_dir() else []
    if runs:
        return [f"  wandb:   {runs[-1]} (offline; upload with: wandb sync {runs[-1]})"]
    online = sorted((run_dir / "wandb").glob("run-*")) if (run_dir / "wandb").is_dir() else []
    return [f"  wandb:   {online[-1]}"] if online else []


def _fmt(value, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def rl_summary(summary: dict, run_dir: Path) -> list[str]:
    """The lines `python -m launch.rl` ends with."""
    lines = [f"done: {summary.get('rl_steps')} RL steps in {_fmt(summary.get('wall_s'), '.0f')} s "
             f"({summary.get('algo')}, {summary.get('task')}, {summary.get('mode')} mode)",
             f"  reward:  {_fmt(summary.get('reward.first_10pct'), '.3f')} (first 10 % of steps) -> "
             f"{_fmt(summary.get('reward.last_10pct'), '.3f')} (last 10 %)"]
    if summary.get("eval/reward_mean") is not None:
        lines.append(f"  eval:    reward {_fmt(summary.get('eval/reward_mean_first'), '.3f')} -> "
                     f"{_fmt(summary.get('eval/reward_mean'), '.3f')}")
    lines.append(f"  sync:    {summary.get('sync.payload_bytes', 0) / 1e6:.2f} MB sent for "
                 f"{summary.get('sync.dense_bytes', 0) / 1e6:.2f} MB of dense weights "
                 f"(x{_fmt(summary.get('sync.ratio'), '.1f')}), checksum mismatches "
                 f"{summary.get('sync.checksum_mismatches')}, weights re-read and verified "
                 f"{summary.get('sync.verify_checks')} times")
    return lines + _footer(summary, run_dir)


def _footer(summary: dict, run_dir: Path, after_weights: list[str] | None = None) -> list[str]:
    """Where a job's outputs are: its weights, `after_weights`, the wandb run, summary and curves."""
    weights = [f"  weights: {summary['export']}"] if summary.get("export") else []
    return [*weights, *(after_weights or []), *wandb_lines(run_dir),
            f"  summary: {run_dir / 'summary.json'}, curves: {run_dir / 'curves.png'}"]


def pretrain_summary(summary: dict, run_dir: Path) -> list[str]:
    """The lines `python -m launch.pretrain` ends with."""
    lines = [f"done: {summary.get('steps')} steps in {_fmt(summary.get('wall_s'), '.0f')} s "
             f"({summary.get('sparsity_method')}, {summary.get('world_size')} trainer ranks)",
             f"  eval loss: {_fmt(summary.get('eval/loss_first'))} -> {_fmt(summary.get('eval/loss_final'))}, "
             f"train loss {_fmt(summary.get('train/loss_final'))}, {_fmt(summary.get('tokens_per_s_mean'), '.0f')} tokens/s"]
    if summary.get("sparsity/density") is not None:
        lines.append(f"  density: {summary['sparsity/density']:.4f}")
    checkpoint = [f"  checkpoint: {summary['checkpoint']}"] if summary.get("checkpoint") else []
    return lines + _footer(summary, run_dir, checkpoint)
