"""Algorithm config (`algo=grpo|ppo`), composed by launch/ under `algo`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AlgoConfig:
    name: str = "grpo"  # grpo | ppo
    clip_eps: float = 0.2  # ratio clipped to [1 - clip_eps, 1 + clip_eps]
    kl_coef: float = 0.0  # weight of the k3 KL to the reference policy (the policy RL started from)
    std_normalize: bool = True  # grpo: divide by the group's std; ppo: by the batch's std
    baseline_decay: float = 0.9  # ppo: EMA of the mean reward used as the baseline
    temperature: float = 1.0  # set by the driver to the rollout temperature (logprobs must agree)


class AlgoConfigError(ValueError):
    pass


def build_objective(cfg: AlgoConfig):
    from trainer.algos.grpo import GRPO
    from trainer.algos.ppo import PPO

    if not 0 < cfg.clip_eps < 1:
        raise AlgoConfigError(f"algo.clip_eps={cfg.clip_eps} must be in (0, 1)")
    if cfg.kl_coef < 0:
        raise AlgoConfigError(f"algo.kl_coef={cfg.kl_coef} must be >= 0")
    if cfg.name == "grpo":
        return GRPO(cfg)
    if cfg.name == "ppo":
        return PPO(cfg)
    raise AlgoConfigError(f"algo.name={cfg.name!r} is unknown; expected 'grpo' or 'ppo'")
