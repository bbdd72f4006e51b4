"""TrainBatch: the rows one optimizer step trains on, as they cross from the driver to the ranks.

One row per sample, [left padding | prompt | completion | right padding] (rollout/batch.py builds
it, from the rollouts or from SFT answers):
    input_ids       [B, T] long   left-padded prompt, then the completion, then right padding
    attention_mask  [B, T]        1 on prompt and completion tokens
    loss_mask       [B, T] float  1 on the completion tokens whose logprob is trained
    old_logprobs    [B, T] float  rollout logprob of each completion token (0 elsewhere)  (RL)
    rewards         [B] float     the completion's reward                               (RL)
    advantages      [B] float     the driver's estimate (grpo, ema_baseline); PPO's come
                                  from its value head on the trainer (trainer/algos/ppo.py)
    current_version [B] bool      rows sampled by the weights being trained             (RL)
    ref_logprobs    [B, T] float  reference-policy logprobs for the KL term (optional)
The objectives read the same fields from `tensors()`, a dict that holds only the fields set.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    current_version: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (the objectives' batch)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def shard(self, world: int) -> list[TrainBatch]:
        """`world` equal blocks of consecutive rows, one per rank (groups of a prompt's samples
        stay on one rank when the group size divides the block)."""
        if world < 1 or self.rows % world:
            raise ValueError(f"a batch of {self.rows} rows does not split into {world} equal shares")
        n = self.rows // world
        return [TrainBatch(**{k: v[r * n:(r + 1) * n] for k, v in self.tensors().items()}) for r in range(world)]
