"""Training objectives: what loss a batch gives. The worker's step is the same for all of them.

An objective is any callable `objective(model, batch) -> (loss, metrics)`: `loss` a scalar
tensor to backpropagate, `metrics` plain floats to log (summed over micro batches by the worker
when their name starts with `sum/`, averaged otherwise). RL objectives (trainer/algos/) follow
the same protocol with their own batch layout.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


class LanguageModelingObjective:
    """Next-token cross entropy. Batch: {"tokens": LongTensor[B, T + 1]} (inputs and targets)."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, {"loss": loss.item(), "sum/tokens": float(targets.numel())}
