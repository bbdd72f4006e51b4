"""A tiny built-in GPT published once (version 1) by an in-process WeightPublisher: the starting
point of the rollout-group and sync tests that need real weights but not a trainer.

A module of its own, importable as `from tiny_policy import published_tiny_policy` (as
tests/cluster_nodes.py: conftest names are ambiguous across the tree)."""
from __future__ import annotations

import torch

from models import ModelConfig, build_model
from sync.config import SyncConfig
from sync.transport import WeightPublisher

TINY_GPT = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=32)


def published_tiny_policy(seed: int = 0, sync_cfg: SyncConfig | None = None
                          ) -> tuple[ModelConfig, dict[str, torch.Tensor], WeightPublisher]:
    """(model config, its bf16 state under `seed`, a publisher that has published it as version 1)."""
    torch.manual_seed(seed)
    model, _ = build_model(TINY_GPT)
    state = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()}
    pub = WeightPublisher(sync_cfg or SyncConfig(mode="sparse"))
    pub.publish(state, 1)
    return TINY_GPT, state, pub
