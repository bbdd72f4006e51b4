"""A frozen, whole copy of the trainer's model (the KL reference policy of the RL algorithms).

Without ZeRO-3 a `copy.deepcopy` of the module is that copy. Under ZeRO-3 it is not: the
copied parameters are empty placeholders without DeepSpeed's bookkeeping, while the copied
modules still carry DeepSpeed's fetch hooks and parameter dicts, so the copy's first forward
fails (`'Parameter' object has no attribute 'ds_status'`). There the copy is a freshly built
model of the same architecture holding each gathered weight, multiplied by its sparsity mask
(what the masked forward computes in eval mode), in the module's dtype and device.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from trainer.param_access import is_zero3


def frozen_copy(module: nn.Module, build: Callable[[], nn.Module],
                masks: Mapping[str, torch.Tensor | None] | None = None) -> nn.Module:
    """A copy of `module` that no later training step changes. `build()` returns a new model of
    the same architecture (used under ZeRO-3 only); `masks`: parameter name -> the sparsifier's
    current mask (None: dense), applied to the copied weights under ZeRO-3 (elsewhere the deep
    copy keeps the masked forward). Collective under ZeRO-3: every rank must call it."""
    params = list(module.named_parameters())
    if not any(is_zero3(p) for _, p in params):
        return copy.deepcopy(module)
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    reference = build()
    first = params[0][1]
    if not is_zero3(first):
        raise ValueError(f"frozen_copy: ZeRO-3 partitions some of the module's parameters but not {params[0][0]!r}")
    reference.to(device=first.device, dtype=first.ds_tensor.dtype)
    targets = dict(reference.named_parameters())
    missing = sorted(set(name for name, _ in params) ^ set(targets))
    if missing:
        raise ValueError(f"frozen_copy: the built model's parameters differ from the trainer's: {missing[:6]}")
    with torch.no_grad():
        for name, p in params:
            with GatheredParameters([p]):
                value = p.detach().clone()
            mask = (masks or {}).get(name)
            if mask is not None:
                value = value * mask.to(value.device)
            targets[name].copy_(value)
    return reference
