"""Supervised warm-up: cross-entropy on the completion tokens (the task's correct answers).

An RL demo on a tiny model learns only when it starts with some reward to find: measured on
the demo's ~0.6M-parameter GPT, a too short warm-up leaves GRPO too few rewarded samples to
learn from, a too long one leaves it nothing to improve.
"""
from __future__ import annotations

import torch

from trainer.algos.logprobs import masked_mean, token_logprobs


class SFT:
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = -masked_mean(logp, batch["loss_mask"])
        return loss, {"sft_loss": float(loss.detach())}
