"""Learning rate as a pure function of the step: linear warmup, then cosine down to min_lr.

A function of the step alone (no scheduler object) means a resumed run needs nothing but the
step to continue the schedule exactly.
"""
from __future__ import annotations

import math

from trainer.config import OptimizerConfig


def lr_at(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
