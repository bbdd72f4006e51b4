"""GRPO (Shao et al., 2024, DeepSeekMath): G completions per prompt, group-relative advantages
(trainer/algos/advantages.py: group_advantages, computed by the driver), trained with the shared
clipped policy loss (trainer/algos/policy_loss.py) and an optional k3 KL to the start policy."""
from __future__ import annotations

from trainer.algos.policy_loss import ClippedPolicyGradient


class GRPO(ClippedPolicyGradient):
    pass


class EMABaselinePG(ClippedPolicyGradient):
    """`algo=ema_baseline`: the clipped policy loss with A = reward - EMA of past mean rewards
    (advantages.EMABaseline, computed by the driver); no value model (PPO's is trainer/algos/ppo.py)."""
