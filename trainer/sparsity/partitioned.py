"""Reading a sparsified weight whole when DeepSpeed ZeRO-3 partitions it across ranks.

Under ZeRO-3 a parameter's `.data` is an empty placeholder except while its module runs: each
rank holds 1/world of the flat weight (`p.ds_tensor`) and DeepSpeed's module pre-forward hook
gathers the whole weight just before `module.forward`. The masked forward
(masked_forward.py) runs inside `module.forward`, after that hook, so it always sees the whole
weight and needs nothing from here. Mask computations outside the forward (N:M recompute in
`before_forward`, static magnitude init) read the weight through `full_weight`, which gathers it
for the duration of the read. Every rank gathers the same bytes, so every rank computes the
same mask from them.
"""
from __future__ import annotations

import torch

from trainer.sparsity.masked_forward import SparseLayer


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (DeepSpeed tags those with `ds_id`)."""
    return hasattr(param, "ds_id")


def full_weight(layer: SparseLayer) -> torch.Tensor:
    """The layer's whole weight as the forward uses it (the working copy: bf16 under bf16), detached.

    Under ZeRO-3 this all-gathers the weight into a private copy: collective, every rank must call
    it for the same layers in the same order (the sparsifier hooks already run on every rank).
    Elsewhere it is the parameter itself, without a copy."""
    weight = layer.weight
    if not is_partitioned(weight):
        return weight.detach()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([weight], modifier_rank=None):
        return weight.detach().clone()
