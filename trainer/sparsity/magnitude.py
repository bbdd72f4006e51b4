"""Gradual magnitude pruning (Zhu & Gupta 2017): from dense to each layer's target with the cubic
schedule s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, pruning the smallest |w| every dt
steps for t in {t0, t0 + dt, ..., t0 + n dt}. Pruned weights are set to 0 in the masters, get no
gradient and never come back. Per-layer targets s_f = 1 - density_l (uniform or ERK).
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.sparsity.base import ParamAccess, Sparsifier, check_unstructured
from trainer.sparsity.config import SparsityConfig
from trainer.sparsity.dynamic import topk_mask
from trainer.sparsity.masked_forward import SparseLayer


def gmp_sparsity(step: int, initial: float, final: float, start: int, n: int, interval: int) -> float:
    """Zhu & Gupta's target sparsity at step t (s_i before t0, s_f after t0 + n dt)."""
    if step < start:
        return initial
    progress = min(1.0, (step - start) / (n * interval))
    return final + (initial - final) * (1.0 - progress) ** 3


def gmp_plan(cfg: SparsityConfig, total_steps: int) -> tuple[int, int, int]:
    """(t0, n, dt): t0 = start_fraction * T, n = round((end - start) * T / dt) pruning intervals."""
    start = int(cfg.prune_start_fraction * total_steps)
    span = int(cfg.prune_end_fraction * total_steps) - start
    n = max(1, round(span / cfg.prune_interval))
    return start, n, cfg.prune_interval


class MagnitudeSparsifier(Sparsifier):
    method = "magnitude"

    def __init__(self, model, cfg: SparsityConfig, total_steps: int, layers: list[SparseLayer], densities: dict[str, float]):
        super().__init__(model, cfg, total_steps, layers)
        self.start, self.n, self.interval = gmp_plan(cfg, total_steps)
        for layer in self.layers.values():
            layer.extra["density"] = densities[layer.name]
            layer.extra["final_active"] = max(1, round(densities[layer.name] * layer.numel))
            layer.mask_gradient = True
        self.sparsity_level = 0.0  # the schedule's fraction of the way to each layer's target

    def is_prune_step(self, step: int) -> bool:
        return self.start <= step <= self.start + self.n * self.interval and (step - self.start) % self.interval == 0

    def after_optimizer_step(self, step: int, params: ParamAccess) -> None:
        if not self.is_prune_step(step):
            return
        for layer in self.layers.values():
            final = 1.0 - layer.extra["density"]
            sparsity = gmp_sparsity(step, self.cfg.initial_sparsity, final, self.start, self.n, self.interval)
            keep = layer.numel - round(sparsity * layer.numel)
            keep = max(keep, layer.extra["final_active"])
            weight = params.get(layer.name)
            old = layer.mask.to(weight.device) if layer.mask is not None else None
            scores = weight.abs().float()
            if old is not None:  # pruned weights never come back
                scores = torch.where(old, scores, torch.tensor(-1.0, device=weight.device))
            new = topk_mask(scores, keep)
            params.set(layer.name, weight * new)
            params.reset_optimizer_state(layer.name, ~new if old is None else old & ~new)
            layer.record_mask(new.to(layer.weight.device))
        progress = min(1.0, (step - self.start) / (self.n * self.interval))
        self.sparsity_level = 1.0 - (1.0 - progress) ** 3

    def pattern(self, layer: SparseLayer) -> dict[str, Any]:
        active = layer.numel if layer.mask is None else int(layer.mask.sum())
        return {"kind": "unstructured", "density": active / layer.numel}

    def _check_layer(self, layer: SparseLayer, value: torch.Tensor) -> None:
        active = layer.numel if layer.mask is None else int(layer.mask.sum())
        check_unstructured(layer, value, active)

    def _family_state(self) -> dict:
        return {"sparsity_level": self.sparsity_level}

    def _load_family_state(self, state: dict) -> None:
        self.sparsity_level = state["sparsity_level"]
        for layer in self.layers.values():
            layer.mask_gradient = True


