"""Algorithm config (`algo=grpo|ppo|ema_baseline`), composed by launch/ under `algo`."""
from __future__ import annotations

from dataclasses import dataclass

from models.checks import check_settings

ALGOS = ("grpo", "ppo", "ema_baseline")


@dataclass
class AlgoConfig:
    name: str = "grpo"  # grpo | ppo | ema_baseline
    clip_eps: float = 0.2  # ratio clipped to [1 - clip_eps, 1 + clip_eps]
    kl_coef: float = 0.0  # weight of the k3 KL to the reference policy (the policy RL started from)
    std_normalize: bool = True  # grpo: divide by the group's std; ppo / ema_baseline: by the batch's std
    baseline_decay: float = 0.9  # ema_baseline: EMA of the mean reward used as the baseline
    gamma: float = 1.0  # ppo: GAE discount over completion tokens
    lam: float = 0.95  # ppo: GAE lambda
    value_lr: float = 1.0e-3  # ppo: Adam learning rate of the value head
    value_clip: float = 0.2  # ppo: value updates clipped to +- this around the values before the step
    value_epochs: int = 4  # ppo: value-head updates per batch (the clip matters from the second on)
    # >0: truncated importance sampling against the rollout engine / trainer mismatch (as veRL's
    # TIS): rows of the current version take the ratio against the trainer's own logprobs and
    # weight their loss by min(exp(trainer - engine logprob), tis_cap). null / 0: off.
    tis_cap: float | None = None
    temperature: float = 1.0  # set by the driver to the rollout temperature (logprobs must agree)


class AlgoConfigError(ValueError):
    pass


def build_objective(cfg: AlgoConfig):
    from trainer.algos.grpo import GRPO, EMABaselinePG
    from trainer.algos.ppo import PPO

    check_settings(AlgoConfigError, [
        (0 < cfg.clip_eps < 1, f"algo.clip_eps={cfg.clip_eps} must be in (0, 1)"),
        (cfg.kl_coef >= 0, f"algo.kl_coef={cfg.kl_coef} must be >= 0"),
        (cfg.tis_cap is None or cfg.tis_cap >= 0, f"algo.tis_cap={cfg.tis_cap} must be null, 0 (off) or > 0 (the cap, e.g. 2)"),
    ])
    if cfg.name == "grpo":
        return GRPO(cfg)
    if cfg.name == "ema_baseline":
        return EMABaselinePG(cfg)
    if cfg.name == "ppo":
        check_settings(AlgoConfigError, [
            (0 <= cfg.gamma <= 1, f"algo.gamma={cfg.gamma} must be in [0, 1]"),
            (0 <= cfg.lam <= 1, f"algo.lam={cfg.lam} must be in [0, 1]"),
            (cfg.value_lr > 0, f"algo.value_lr={cfg.value_lr} must be > 0"),
            (cfg.value_clip > 0, f"algo.value_clip={cfg.value_clip} must be > 0"),
            (cfg.value_epochs >= 1, f"algo.value_epochs={cfg.value_epochs} must be >= 1"),
        ])
        return PPO(cfg)
    raise AlgoConfigError(f"algo.name={cfg.name!r} is unknown; expected one of {list(ALGOS)}")
