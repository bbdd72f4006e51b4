"""Shared helpers of the sparsity tests: a tiny GPT, a training step, random batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import GPT, GPTConfig
from trainer.sparsity import SparsityConfig, TorchParamAccess, build_sparsifier


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    # input dims 64 (c_attn, attn.c_proj, c_fc) and 256 (mlp.c_proj): M up to 64 divides them
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))


def batch(step: int, size: int = 4, length: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 256, (size, length + 1), generator=g)


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


class Run:
    """model + AdamW + sparsifier, stepping the way a trainer does."""

    def __init__(self, cfg: SparsityConfig, total_steps: int, seed: int = 0, lr: float = 1e-2):
        self.model = tiny_gpt(seed)
        self.sparsifier = build_sparsifier(self.model, cfg, total_steps)
        self.sparsifier.attach()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.params = TorchParamAccess(self.model, self.optimizer)
        self.lr = lr
        self.step = 0

    def train_step(self) -> float:
        self.sparsifier.set_step_context(lr=self.lr, peak_lr=self.lr, micro_batches=1)
        self.sparsifier.before_forward(self.step)
        loss = lm_loss(self.model, batch(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sparsifier.after_optimizer_step(self.step, self.params)
        self.step += 1
        return loss.item()

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: None if layer.mask is None else layer.mask.clone() for n, layer in self.sparsifier.layers.items()}
