"""RL and warm-up objectives: each `__call__(model, batch) -> (loss, metrics)`, free of Ray and I/O.

Batch layout shared by all of them (dict of tensors, one row per sample):
    input_ids       [B, T] long   left-padded prompt, then the completion, then right padding
    attention_mask  [B, T]        1 on prompt and completion tokens
    loss_mask       [B, T]        1 on the completion tokens whose logprob is trained
    old_logprobs    [B, T] float  rollout logprob of each completion token (0 elsewhere)  (RL)
    rewards         [B] float     the completion's reward                               (RL)
    advantages      [B] float     driver-side estimate (grpo, ema_baseline)              (RL)
    ref_logprobs    [B, T] float  optional: reference-policy logprobs for the KL term      (RL)
    current_version [B] bool      optional: rows sampled by the weights being trained    (RL)

All RL algorithms share one clipped policy loss (policy_loss.py) and differ in their advantage
estimator (advantages.py); PPO adds a value head (ppo.py).
"""
from trainer.algos.advantages import EMABaseline, GroupRelative, baseline_advantages, build_advantage_estimator, gae, group_advantages
from trainer.algos.config import AlgoConfig, AlgoConfigError, build_objective
from trainer.algos.grpo import GRPO, EMABaselinePG
from trainer.algos.logprobs import token_logprobs
from trainer.algos.ppo import PPO
from trainer.algos.sft import SFT

__all__ = [
    "AlgoConfig", "AlgoConfigError", "build_objective", "build_advantage_estimator", "GRPO", "EMABaselinePG",
    "group_advantages", "baseline_advantages", "gae", "GroupRelative", "EMABaseline", "PPO", "SFT", "token_logprobs",
]
