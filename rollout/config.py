"""Rollout config (`rollout=...`), composed by launch/ under `rollout`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RolloutConfig:
    workers: int = 2  # rollout worker actors
    prompts_per_step: int = 16  # prompts per optimizer step, split across the workers
    samples_per_prompt: int = 8  # completions per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 5
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "bfloat16"  # the policy copy's dtype (must match sync.published_dtype)
    num_cpus: float = 0.5  # Ray CPU slots per worker actor
    num_gpus: float = 0.0  # Ray GPU share per worker actor
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources (pin to nodes)
    num_threads: int = 1  # torch intra-op threads per worker
    nice: int = 0  # OS priority offset of worker processes (>0: the trainer, on the critical path, runs first)
    max_restarts: int = 3  # dead workers replaced during one job before it gives up
    seed: int = 0


class RolloutConfigError(ValueError):
    pass


def validate_rollout_config(cfg: RolloutConfig) -> None:
    if cfg.workers < 1:
        raise RolloutConfigError(f"rollout.workers={cfg.workers}: expected >= 1")
    checks = [
        (cfg.prompts_per_step >= cfg.workers,
         f"rollout.prompts_per_step={cfg.prompts_per_step}: expected >= rollout.workers={cfg.workers}"),
        (cfg.prompts_per_step % cfg.workers == 0,
         f"rollout.prompts_per_step={cfg.prompts_per_step}: expected a multiple of rollout.workers={cfg.workers}"),
        (cfg.samples_per_prompt >= 1, f"rollout.samples_per_prompt={cfg.samples_per_prompt}: expected >= 1"),
        (cfg.temperature > 0, f"rollout.temperature={cfg.temperature}: expected > 0"),
        (0 < cfg.top_p <= 1, f"rollout.top_p={cfg.top_p}: expected in (0, 1]"),
        (cfg.max_new_tokens >= 1, f"rollout.max_new_tokens={cfg.max_new_tokens}: expected >= 1"),
        (cfg.device in ("cpu", "cuda", "auto"), f"rollout.device={cfg.device!r}: expected cpu, cuda or auto"),
        (cfg.dtype in ("bfloat16", "float16", "float32"), f"rollout.dtype={cfg.dtype!r}: expected bfloat16, float16 or float32"),
        (cfg.num_cpus > 0, f"rollout.num_cpus={cfg.num_cpus}: expected > 0"),
        (cfg.num_gpus >= 0, f"rollout.num_gpus={cfg.num_gpus}: expected >= 0"),
        (cfg.num_threads >= 1, f"rollout.num_threads={cfg.num_threads}: expected >= 1"),
        (0 <= cfg.nice <= 19, f"rollout.nice={cfg.nice}: expected 0..19"),
        (cfg.max_restarts >= 0, f"rollout.max_restarts={cfg.max_restarts}: expected >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise RolloutConfigError(message)
