"""Supervised warm-up: cross-entropy on the completion tokens (the task's correct answers).

An RL demo on a tiny model learns only when it starts with some reward to find
(MEASURED.md: "The warm start decides whether the demo shows learning").
"""
from __future__ import annotations

import torch

from trainer.algos.logprobs import masked_mean, token_logprobs


class SFT:
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = -masked_mean(logp, batch["loss_mask"])
        return loss, {"sft_loss": float(loss.detach())}
