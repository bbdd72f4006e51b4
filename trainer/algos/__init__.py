"""RL and warm-up objectives: each `__call__(model, batch) -> (loss, metrics)`, free of Ray and I/O.

Their batch: the fields of trainer/algos/batch.py TrainBatch, by name (`TrainBatch.tensors()`).

All RL algorithms share one clipped policy loss (policy_loss.py) and differ in their advantage
estimator (advantages.py); PPO adds a value head (ppo.py).
"""
from trainer.algos.batch import TrainBatch
from trainer.algos.advantages import EMABaseline, GroupRelative, baseline_advantages, build_advantage_estimator, gae, group_advantages
from trainer.algos.config import AlgoConfig, AlgoConfigError, build_objective
from trainer.algos.grpo import GRPO, EMABaselinePG
from trainer.algos.logprobs import token_logprobs
from trainer.algos.ppo import PPO
from trainer.algos.sft import SFT

__all__ = [
    "AlgoConfig", "AlgoConfigError", "TrainBatch", "build_objective", "build_advantage_estimator", "GRPO", "EMABaselinePG",
    "group_advantages", "baseline_advantages", "gae", "GroupRelative", "EMABaseline", "PPO", "SFT", "token_logprobs",
]
