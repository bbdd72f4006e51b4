"""RL and warm-up objectives: each `__call__(model, batch) -> (loss, metrics)`, free of Ray and I/O.

Batch layout shared by all of them (dict of tensors, one row per sample):
    input_ids       [B, T] long   left-padded prompt, then the completion, then right padding
    attention_mask  [B, T]        1 on prompt and completion tokens
    loss_mask       [B, T]        1 on the completion tokens whose logprob is trained
    old_logprobs    [B, T] float  rollout logprob of each completion token (0 elsewhere)  (RL)
    advantages      [B] float                                                             (RL)
    ref_logprobs    [B, T] float  optional: reference-policy logprobs for the KL term      (RL)
    current_version [B] bool      optional: rows sampled by the weights being trained    (RL)
"""
from trainer.algos.config import AlgoConfig, AlgoConfigError, build_objective
from trainer.algos.grpo import GRPO, group_advantages
from trainer.algos.logprobs import token_logprobs
from trainer.algos.ppo import PPO, baseline_advantages
from trainer.algos.sft import SFT

__all__ = [
    "AlgoConfig", "AlgoConfigError", "build_objective", "GRPO", "group_advantages", "PPO",
    "baseline_advantages", "SFT", "token_logprobs",
]
