"""Unstructured sparsity at a constant parameter budget: SET (Mocanu et al. 2018), RigL
(Evci et al. 2020) and static masks; layer densities uniform or ERK.

Starting masks: the largest |w| of the starting weights (init=magnitude, the default from a
pretrained model) or random; init_scale=fan_in rescales a fresh init per output row (RigL's
sparse init). Inactive weights get no gradient and stay 0 in the masters; every
`update_interval` steps until `end_fraction` of training, drop the k = f(t) * n_active
smallest-|w| active weights (f(t) = alpha/2 (1 + cos(pi t / T_end)), or alpha for SET's
constant schedule) and grow k inactive ones: RigL by the largest |dense
gradient| of the update step's batch (captured in backward, all-reduced across data-parallel
ranks), SET at random from a generator seeded identically on every rank. Grown weights start
at 0 and their optimizer moments are reset.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from trainer.sparsity.base import ParamAccess, Sparsifier, check_unstructured, zero_inactive
from trainer.sparsity.config import SparsityConfig, effective_init
from trainer.sparsity.masked_forward import SparseLayer
from trainer.sparsity.partitioned import full_weight


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (RigL): density_l = eps * (sum(dims_l) / prod(dims_l)) ** power_scale
    (RigL's erk_power_scale; 1 is ERK, 0 uniform), with eps chosen so the active count equals
    density * total; layers that would exceed 1 are dense and eps is solved again over the rest."""
    numel = {name: math.prod(s) for name, s in shapes.items()}
    raw = {name: (sum(s) / math.prod(s)) ** power_scale for name, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / divisor
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        top = max(raw[n] for n in over)
        dense.update(n for n in over if raw[n] == top)  # the largest raw density first, as RigL does
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def cosine_drop_fraction(step: int, alpha: float, end_step: int) -> float:
    """RigL's f(t) = alpha / 2 * (1 + cos(pi * t / T_end))."""
    return alpha / 2 * (1 + math.cos(math.pi * step / end_step))


def drop_fraction_at(step: int, alpha: float, end_step: int, schedule: str) -> float:
    """cosine (RigL) or constant alpha (SET's zeta)."""
    return alpha if schedule == "constant" else cosine_drop_fraction(step, alpha, end_step)


def fan_in_scale(mask: torch.Tensor, input_dim: int) -> torch.Tensor:
    """Per-output-row factor sqrt(fan_in / active fan_in) (1 for rows with no active weight),
    shaped to broadcast over the weight: RigL's sparse init keeps each unit's pre-activation
    variance at the dense init's."""
    fan_in = mask.shape[input_dim]
    active = mask.sum(dim=input_dim, keepdim=True).float()
    return torch.where(active > 0, (fan_in / active.clamp(min=1)).sqrt(), torch.ones_like(active))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest scores (same shape)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class DynamicSparsifier(Sparsifier):
    """method = rigl | set | static (static never updates)."""

    def __init__(self, model, cfg: SparsityConfig, total_steps: int, layers: list[SparseLayer],
                 densities: dict[str, float], pretrained: bool = False):
        super().__init__(model, cfg, total_steps, layers)
        self.method = cfg.method
        self.init = effective_init(cfg, pretrained)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.end_step = int(cfg.end_fraction * total_steps)
        for layer in self.layers.values():
            layer.extra["density"] = densities[layer.name]
            layer.extra["active"] = max(1, round(densities[layer.name] * layer.numel))
            layer.mask_gradient = True
        self.drop_fraction = 0.0
        self.masters_zeroed = False

    def is_update_step(self, step: int) -> bool:
        return (
            self.method in ("rigl", "set") and 0 < step < self.end_step
            and step % self.cfg.update_interval == 0
        )

    def random_scores(self, layer: SparseLayer) -> torch.Tensor:
        return torch.rand(layer.shape, generator=self.generator).to(layer.weight.device)

    def attach(self) -> None:
        # Initial masks unless a state was loaded: the largest |w| of the starting weights
        # (init=magnitude: a pretrained model keeps what matters) or random. attach runs before
        # the optimizer/DeepSpeed exist, so the module's weights are the fp32 starting weights.
        # The masters' inactive entries are zeroed through ParamAccess after the first step: the
        # forward masks them until then. Only init_scale=fan_in (from scratch) rescales weights
        # here, before DeepSpeed copies them into its masters.
        for layer in self.layers.values():
            if layer.mask is None:
                weight = full_weight(layer)
                scores = weight.abs().float() if self.init == "magnitude" else self.random_scores(layer)
                layer.record_mask(topk_mask(scores, layer.extra["active"]))
                if self.cfg.init_scale == "fan_in":
                    with torch.no_grad():
                        scale = fan_in_scale(layer.current_mask(), layer.input_dim).to(weight.device, weight.dtype)
                        layer.weight.mul_(scale)
        super().attach()

    def before_forward(self, step: int) -> None:
        if step == self.step:
            return
        self.step = step
        capture = self.method == "rigl" and self.is_update_step(step)
        for layer in self.layers.values():
            layer.capture_dense_grad = capture
            layer.dense_grad = None

    def after_optimizer_step(self, step: int, params: ParamAccess) -> None:
        if not self.masters_zeroed:
            for layer in self.layers.values():
                zero_inactive(layer, params)
            self.masters_zeroed = True
        if not self.is_update_step(step):
            return
        self.drop_fraction = drop_fraction_at(step, self.cfg.drop_fraction, self.end_step, self.cfg.drop_schedule)
        for layer in self.layers.values():
            self.update_layer(layer, params)
            layer.capture_dense_grad = False
            layer.dense_grad = None

    def update_layer(self, layer: SparseLayer, params: ParamAccess) -> None:
        old = layer.current_mask()
        weight = params.get(layer.name)
        device = weight.device
        old_d = old.to(device)
        n_active = int(old.sum())
        k = int(self.drop_fraction * n_active)
        if k == 0:
            return
        neg_inf = torch.tensor(-math.inf, device=device)
        keep = topk_mask(torch.where(old_d, weight.abs().float(), neg_inf), n_active - k)
        if self.method == "rigl":
            if layer.dense_grad is None:
                raise RuntimeError(
                    f"RigL update at step {self.step} found no dense gradient for {layer.name}: "
                    f"call before_forward(step) before the forward/backward of every step"
                )
            grow_scores = _all_reduce_sum(layer.dense_grad.to(device)).abs()
        else:
            grow_scores = self.random_scores(layer).to(device)
        grow = topk_mask(torch.where(keep, neg_inf, grow_scores.float()), k)
        new = keep | grow
        newly_grown = grow & ~old_d
        params.set(layer.name, torch.where(new & ~newly_grown, weight, torch.zeros_like(weight)))
        params.reset_optimizer_state(layer.name, new ^ old_d)
        layer.record_mask(new.to(old.device))

    def pattern(self, layer: SparseLayer) -> dict[str, Any]:
        return {"kind": "unstructured", "density": layer.extra["active"] / layer.numel}

    def _check_layer(self, layer: SparseLayer, value: torch.Tensor) -> None:
        check_unstructured(layer, value, layer.extra["active"])

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out["sparsity/drop_fraction"] = float(self.drop_fraction)
        out["sparsity/init_magnitude"] = 1.0 if self.init == "magnitude" else 0.0
        return out

    def describe(self) -> dict[str, Any]:
        return {"init": self.init, "init_scale": self.cfg.init_scale, "drop_schedule": self.cfg.drop_schedule}

    def _family_state(self) -> dict:
        return {"generator": self.generator.get_state(), "drop_fraction": self.drop_fraction,
                "masters_zeroed": self.masters_zeroed}

    def _load_family_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drop_fraction = state["drop_fraction"]
        self.masters_zeroed = state["masters_zeroed"]
        for layer in self.layers.values():
            layer.mask_gradient = True
