"""Trainer and optimizer configs (composed by launch/config.py into the job configs)."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.checks import check_settings


@dataclass
class TrainerConfig:
    max_steps: int = 500  # optimizer steps
    device: str = "auto"  # auto | cpu | cuda  (auto: cuda when available)
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights/activations, fp32 master weights)
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    grad_accum: int = 1  # micro batches per optimizer step, per rank
    micro_batch_size: int = 8  # sequences per micro batch, per rank
    seq_len: int = 128
    seed: int = 0
    checkpoint_every: int = 100  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest k kept; 0 = keep all
    eval_every: int = 50  # steps; 0 = only at the start and the end
    eval_batches: int = 8  # per rank
    log_every: int = 10
    grad_clip: float = 1.0  # 0 = off
    num_threads: int = 1  # torch intra-op threads per trainer rank


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr: float = 2e-4  # cosine decays from lr to min_lr at trainer.max_steps


class TrainerConfigError(ValueError):
    """A trainer/optimizer setting outside its allowed values."""


def validate_trainer_config(cfg: TrainerConfig, opt: OptimizerConfig) -> None:
    checks = [
        (cfg.device in ("auto", "cpu", "cuda"), f"trainer.device={cfg.device!r}: expected auto, cpu or cuda"),
        (cfg.precision in ("fp32", "bf16"), f"trainer.precision={cfg.precision!r}: expected fp32 or bf16"),
        (cfg.zero_stage in (0, 1, 2, 3), f"trainer.zero_stage={cfg.zero_stage}: expected 0, 1, 2 or 3"),
        (cfg.max_steps >= 1, f"trainer.max_steps={cfg.max_steps}: expected >= 1"),
        (cfg.grad_accum >= 1, f"trainer.grad_accum={cfg.grad_accum}: expected >= 1"),
        (cfg.micro_batch_size >= 1, f"trainer.micro_batch_size={cfg.micro_batch_size}: expected >= 1"),
        (cfg.seq_len >= 1, f"trainer.seq_len={cfg.seq_len}: expected >= 1"),
        (cfg.checkpoint_every >= 0, f"trainer.checkpoint_every={cfg.checkpoint_every}: expected >= 0"),
        (cfg.keep_checkpoints >= 0, f"trainer.keep_checkpoints={cfg.keep_checkpoints}: expected >= 0"),
        (cfg.eval_every >= 0, f"trainer.eval_every={cfg.eval_every}: expected >= 0"),
        (cfg.eval_batches >= 1, f"trainer.eval_batches={cfg.eval_batches}: expected >= 1"),
        (cfg.log_every >= 1, f"trainer.log_every={cfg.log_every}: expected >= 1"),
        (cfg.grad_clip >= 0, f"trainer.grad_clip={cfg.grad_clip}: expected >= 0"),
        (cfg.num_threads >= 1, f"trainer.num_threads={cfg.num_threads}: expected >= 1"),
        (opt.name == "adamw", f"optimizer.name={opt.name!r}: expected adamw"),
        (opt.lr > 0, f"optimizer.lr={opt.lr}: expected > 0"),
        (0 <= opt.min_lr <= opt.lr, f"optimizer.min_lr={opt.min_lr}: expected in [0, optimizer.lr]"),
        (len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), f"optimizer.betas={list(opt.betas)}: expected two values in [0, 1)"),
        (opt.warmup_steps >= 0, f"optimizer.warmup_steps={opt.warmup_steps}: expected >= 0"),
        (opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay}: expected >= 0"),
    ]
    check_settings(TrainerConfigError, checks)
