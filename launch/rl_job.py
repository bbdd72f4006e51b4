"""The RL job's plan and state: everything `plan_run` settles before Ray starts (RLPlan), the
driver's own state saved in every checkpoint (DriverState), and the running job (RLJob: the actor
groups, the publisher, the logger, and where each step's numbers are recorded). launch/rl.py
runs it.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launch.rl_config import RLConfigError, RLJobConfig, derived_trainer_config, validate_rl_config
from launch.rl_metrics import new_totals, remember
from rollout.results import RolloutBatch
from sync.payloads import SyncStats

if TYPE_CHECKING:
    from launch.loggers import MetricsLogger
    from launch.rl_rollouts import RolloutGroup
    from launch.rl_trainers import RLTrainers
    from sync.transport import ShardedPublisher


@dataclass
class RLPlan:
    """Everything settled before Ray starts: the checked config, task, tokenizer, where to resume."""
    cfg: RLJobConfig
    run_dir: Path
    trainer_cfg: Any  # trainer.config.TrainerConfig derived from the rollout and rl settings
    algo_cfg: Any  # trainer.algos.AlgoConfig at the rollout temperature
    task: Any  # rollout.tasks.Task: the prompts (its position is part of the driver state)
    eval_prompts: list  # data.prompts.Sample: what rl.eval_every evaluates ([] without evaluation)
    tokenizer: Any
    fingerprint: dict  # what a checkpoint must match to be resumed by this run
    resume_from: Path | None

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass
class DriverState:
    """What the driver itself must carry across a checkpoint (the ranks keep the rest)."""
    step: int = 0  # RL steps taken
    version: int = 0  # the trainer's newest published weight version
    history: dict[str, list[float]] = field(default_factory=dict)  # every logged metric, by step
    totals: dict[str, float] = field(default_factory=new_totals)  # sync traffic and sample accounting
    rng: random.Random = field(default_factory=random.Random)  # built-in tasks draw their prompts from it
    advantages: Any = None  # the driver-side advantage estimator (trainer/algos/advantages.py), or None
    task: Any = None  # the prompt source: a dataset's position is in its state_dict

    def state_dict(self) -> dict:
        return {"rl_step": self.step, "version": self.version, "history": self.history, "totals": self.totals,
                "rng": self.rng.getstate(), "task": self.task.state_dict() if self.task is not None else {},
                "advantages": None if self.advantages is None else self.advantages.state_dict()}

    def load_state_dict(self, state: dict, keep_totals: bool = False) -> None:
        """Roll back to `state`; `keep_totals` keeps the traffic counted since (a trainer restart
        within one job: the bytes really crossed the wire)."""
        self.step, self.version, self.history = state["rl_step"], state.get("version", 0), state["history"]
        if not keep_totals:
            self.totals = {**new_totals(), **state["totals"]}
        self.rng.setstate(state["rng"])
        if self.advantages is not None and state.get("advantages") is not None:
            self.advantages.load_state_dict(state["advantages"])
        if self.task is not None:
            self.task.load_state_dict(state.get("task", {}))


@dataclass
class RLJob:
    """The running job: plan, actor groups, logger, driver state, and per-run bookkeeping."""
    plan: RLPlan
    trainers: RLTrainers
    publisher: ShardedPublisher  # the driver's, over the trainer ranks (reconnected after a restart)
    rollouts: RolloutGroup  # asks the publisher for updates
    logger: MetricsLogger
    state: DriverState
    checksums: dict[int, str] = field(default_factory=dict)  # published version -> checksum
    rl_start_version: int = 0  # the version RL (re)started from (async offers never reach below)
    in_flight: list = field(default_factory=list)  # this step's samples (dropped if the trainer dies)
    launched: dict[int, list] = field(default_factory=dict)  # async: the prompts of each worker's running batch

    @property
    def cfg(self) -> RLJobConfig:
        return self.plan.cfg

    @property
    def async_mode(self) -> bool:
        return self.cfg.rl.mode == "async" and self.cfg.rl.max_staleness > 0

    @property
    def per_worker(self) -> int:
        return self.cfg.rollout.prompts_per_step // self.cfg.rollout.workers

    @property
    def group_size(self) -> int:
        return self.cfg.rollout.samples_per_prompt

    def next_prompts(self) -> list:
        """One share of prompts (Samples) for one worker."""
        return self.plan.task.sample(self.per_worker, self.state.rng)

    def min_version(self) -> int:
        """A batch launched now is trained after the next publish: it may be at most
        max_staleness versions older than that one."""
        return self.state.version + 1 - self.cfg.rl.max_staleness

    def verify_workers(self) -> tuple[int, list[int | None]]:
        """Every worker re-reads and digests the weights it handed its engine (not the digests cached
        at commit) and checks what its engine computes against them (rollout/results.py
        WeightCheck); the driver compares the digest with the publisher's checksum of that version
        and the engine's logprob difference with rollout.vllm.verify_logprob_tol. Returns the number
        of workers that failed (counted in sync.verify_mismatches) and the workers' versions."""
        bad, checks = 0, self.rollouts.verify_all()
        tol = self.cfg.rollout.vllm.verify_logprob_tol
        for i, check in enumerate(checks):
            self.state.totals["verify_checks"] += 1
            wrong_bits = check.version is None or check.checksum != self.checksums.get(check.version)
            wrong_engine = check.engine_logprob_diff is not None and check.engine_logprob_diff > tol
            if wrong_bits or wrong_engine:
                bad += 1
                print(f"sync verify: rollout worker {i} at version {check.version}: "
                      + ("its committed weights differ from the published checksum" if wrong_bits else
                         f"its engine's logprobs differ by {check.engine_logprob_diff:.3g} from its committed weights' "
                         f"(rollout.vllm.verify_logprob_tol={tol})"), flush=True)
                if wrong_bits:  # its digests cached at commit lie: only a snapshot restores it
                    self.rollouts.resync_snapshot(i, "re-read weights differ from the published checksum")
        self.state.totals["verify_mismatches"] += bad
        diffs = [c.engine_logprob_diff for c in checks if c.engine_logprob_diff is not None]
        if diffs:
            self.state.totals["engine_logprob_diff_max"] = max(self.state.totals.get("engine_logprob_diff_max", 0.0), *diffs)
        return bad, [c.version for c in checks]

    def count_mismatches(self, sync_stats: list[SyncStats]) -> None:
        for st in sync_stats:
            if st.version is None or st.checksum != self.checksums.get(st.version):
                self.state.totals["mismatches"] += 1

    def record(self, metrics: dict[str, float]) -> None:
        """Into the history, the loggers and steps.jsonl; a console line every rl.log_every steps."""
        s, rl = self.state, self.cfg.rl
        self.logger.log(remember(s.history, metrics), s.step)
        with open(self.plan.run_dir / "steps.jsonl", "a") as f:
            f.write(json.dumps({"step": s.step, **metrics}) + "\n")
        if s.step % rl.log_every == 0 or s.step == rl.steps:
            from tqdm import tqdm

            window = s.history["reward/mean"][-rl.log_every:]
            tqdm.write(f"rl step {s.step}/{rl.steps} v{s.version} reward {sum(window) / len(window):.3f} "
                       f"staleness {metrics['staleness/mean']:.2f} sync x{metrics['sync/ratio']:.1f} "
                       f"step {metrics['step_s']:.2f}s")

    def log_samples(self, shares: list[RolloutBatch]) -> None:
        """Every logger.samples_every steps: the completions of each worker's first prompt as a
        `samples` table (prompt, completion, reward, each reward function's reward, version)."""
        every = self.cfg.logger.samples_every
        if not every or self.state.step % every:
            return
        names = list(shares[0].reward_components)
        columns = ["step", "version", "prompt", "completion", "reward", *[f"reward/{n}" for n in names]]
        rows = []
        for s in shares:
            prompt = s.prompts[0] if isinstance(s.prompts[0], str) else json.dumps(s.prompts[0], ensure_ascii=False)
            for j in range(min(self.group_size, s.size)):
                rows.append([self.state.step, s.version, prompt, s.completions[j], float(s.rewards[j]),
                             *[s.reward_components[n][j] for n in names]])
        self.logger.log_table("samples", columns, rows, self.state.step)


def plan_run(cfg: RLJobConfig, run_dir: Path) -> RLPlan:
    """Check the config, load the prompts, pick (and check) the checkpoint to resume: every bad
    input fails here."""
    import torch

    from models import build_model
    from rollout.tasks import build_task
    from trainer import checkpoint as ckpt

    validate_rl_config(cfg)
    # Reward files by absolute path: rollout workers need not share the driver's working directory.
    cfg = replace(cfg, task=replace(cfg.task, reward_fns=[absolute_reward_spec(s) for s in cfg.task.reward_fns]))
    algo_cfg = replace(cfg.algo, temperature=cfg.rollout.temperature)  # trainer logprobs = rollout logprobs
    task = build_task(cfg.task)
    eval_prompts = task.eval_samples() if cfg.rl.eval_every else []
    with torch.device("meta"):
        _, tokenizer = build_model(cfg.model)
    fingerprint = rl_fingerprint(cfg)
    resume_from = ckpt.find_resume_checkpoint(cfg.rl.resume, run_dir / "checkpoints", key="rl.resume",
                                              error=RLConfigError)
    if resume_from is not None:
        ckpt.validate_checkpoint(resume_from, fingerprint)
    return RLPlan(cfg, run_dir, derived_trainer_config(cfg), algo_cfg, task, eval_prompts, tokenizer, fingerprint,
                  resume_from)


def absolute_reward_spec(spec: str) -> str:
    where, sep, attr = spec.rpartition(":")
    return f"{Path(where).resolve()}:{attr}" if sep and where.endswith(".py") else spec


def rl_fingerprint(cfg: RLJobConfig) -> dict:
    """What a checkpoint must match to be resumed by this config."""
    import torch

    from models import build_model

    with torch.device("meta"):
        model, _ = build_model(cfg.model)
    return {"world_size": cfg.cluster.trainers, "zero_stage": cfg.trainer.zero_stage,
            "precision": cfg.trainer.precision, "sparsity_method": cfg.sparsity.method,
            "param_shapes": {n: list(p.shape) for n, p in model.named_parameters()}, "algo": cfg.algo.name}
