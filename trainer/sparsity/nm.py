"""N:M fine-grained structured sparsity: STE / SR-STE (Zhou et al. 2021) and progressive
gradient flow (Bambhaniya et al. 2024: MDGF mask decay, SDGF structure decay).

Phases over training: dense steps [0, d), sparse steps [d, T - f), fine-tune steps [T - f, T)
with the hard target mask. The mask is recomputed from the dense weights every `mask_interval`
steps (and whenever the SDGF stage changes); the dense weights are kept and trained.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from trainer.sparsity.base import Sparsifier
from trainer.sparsity.config import SparsityConfig
from trainer.sparsity.errors import SparsityConfigError, SparsityPatternError
from trainer.sparsity.masked_forward import SparseLayer
from trainer.sparsity.partitioned import full_weight


def nm_mask(weight: torch.Tensor, n: int, m: int, input_dim: int = 1) -> torch.Tensor:
    """Bool mask keeping the n largest |w| in every group of m consecutive weights along
    `input_dim`. Ties go to the lower index, the same on every rank and device."""
    w = weight.detach().abs().movedim(input_dim, -1)
    groups = w.reshape(-1, m)
    if n == 1:  # argmax returns the first maximal index: the same tie rule, cheaper
        keep = groups.argmax(dim=1, keepdim=True)
    else:
        # Unique integer keys: the bits of a non-negative float32 order like its value; the
        # position term breaks ties towards the lower index. topk on them is exact and fast.
        bits = groups.float().view(torch.int32).long()
        key = bits * m + torch.arange(m - 1, -1, -1, device=weight.device)
        keep = key.topk(n, dim=1, sorted=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device).scatter_(1, keep, True)
    return mask.reshape(w.shape).movedim(-1, input_dim)


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise SparsityConfigError(f"sparsity.sdgf_stages entry {text!r} is not 'N:M'") from None
    return n, m


def sdgf_stages(n: int, m: int, schedule: str, custom: list[str] | None = None) -> list[tuple[int, int]]:
    """The N:M patterns of structure-decay gradient flow, in order (reference code's
    get_decay_config): sparsify (M-1):M, M/2:M, ..., N:M; densify N:8M, N:4M, N:2M, N:M;
    fine 8N:8M, 4N:4M, 2N:2M, N:M; custom: the listed stages."""
    if schedule == "sparsify":
        frames = int(math.log2(m / n)) + 1
        return [((m - 1) if i == 0 else m // 2**i, m) for i in range(frames)]
    if schedule == "densify":
        return [(n, m * 2 ** (3 - i)) for i in range(4)]
    if schedule == "fine":
        return [(n * 2 ** (3 - i), m * 2 ** (3 - i)) for i in range(4)]
    if schedule == "custom":
        return [parse_nm(s) for s in (custom or [])]
    raise SparsityConfigError(f"sparsity.sdgf_schedule={schedule!r}; expected sparsify|densify|fine|custom")


def stage_starts(dense_steps: int, sparse_steps: int, n_stages: int) -> list[int]:
    """Equal frames over the sparse phase; stage i starts at d + int(i * S / n_stages)."""
    frame = sparse_steps / n_stages
    return [dense_steps + int(i * frame) for i in range(n_stages)]


def mdgf_beta(step: int, first_sparse_step: int, coef: float, kind: str) -> float:
    """Mask-decay factor: linear max(0, 1 - c (t - t0)) or exponential exp(-c (t - t0))."""
    t = step - first_sparse_step
    if kind == "mdgf_linear":
        return max(0.0, 1.0 - coef * t)
    if kind == "mdgf_exp":
        return math.exp(-coef * t)
    raise SparsityConfigError(f"sparsity.gradient_flow={kind!r} is not a mask-decay flow")


class NMSparsifier(Sparsifier):
    method = "nm"

    def __init__(self, model, cfg: SparsityConfig, total_steps: int, layers: list[SparseLayer]):
        super().__init__(model, cfg, total_steps, layers)
        self.dense_steps = int(cfg.dense_fraction * total_steps)
        self.fine_tune_start = total_steps - int(cfg.fine_tune_fraction * total_steps)
        sparse_steps = self.fine_tune_start - self.dense_steps
        for layer in self.layers.values():
            n, m = layer.extra["target_n"], layer.extra["target_m"]
            if cfg.gradient_flow == "sdgf":
                stages = sdgf_stages(n, m, cfg.sdgf_schedule, cfg.sdgf_stages)
            else:
                stages = [(n, m)]
            layer.extra["stages"] = [list(s) for s in stages]
            layer.extra["stage_starts"] = stage_starts(self.dense_steps, sparse_steps, len(stages))
        self.last_recompute: int | None = None
        self.beta = 0.0

    def phase(self, step: int) -> str:
        if step < self.dense_steps:
            return "dense"
        return "sparse" if step < self.fine_tune_start else "fine_tune"

    def stage(self, layer: SparseLayer, step: int) -> tuple[int, int]:
        i = 0
        for j, start in enumerate(layer.extra["stage_starts"]):
            if step >= start:
                i = j
        if step >= self.fine_tune_start:
            i = len(layer.extra["stages"]) - 1
        n, m = layer.extra["stages"][i]
        return n, m

    def attach(self) -> None:
        # A forward or publish before the first step (an eval at step 0) already sees N:M weights.
        # Not recorded as mask history: before_forward(0) recomputes from whatever weights the
        # trainer loads in between.
        if self.phase(0) != "dense":
            for layer in self.layers.values():
                if layer.mask is None:
                    n, m = self.stage(layer, 0)
                    layer.mask = nm_mask(full_weight(layer), n, m, layer.input_dim)
                    layer.extra["current"] = [n, m]
        super().attach()

    def before_forward(self, step: int) -> None:
        if step == self.step:
            return  # another micro-batch of the same step
        self.step = step
        phase = self.phase(step)
        if phase == "dense":
            for layer in self.layers.values():
                layer.mask = None
            return
        flow = self.cfg.gradient_flow
        self.beta = (
            mdgf_beta(step, self.dense_steps, self.cfg.decay_coef, flow)
            if phase == "sparse" and flow in ("mdgf_linear", "mdgf_exp") else 0.0
        )
        due = self.last_recompute is None or step - self.last_recompute >= self.cfg.mask_interval
        lam = self.cfg.sr_ste_lambda if self.cfg.estimator == "sr_ste" else 0.0
        recomputed = False
        for layer in self.layers.values():
            n, m = self.stage(layer, step)
            if due or layer.mask is None or [n, m] != layer.extra.get("current"):
                layer.record_mask(nm_mask(full_weight(layer), n, m, layer.input_dim))
                layer.extra["current"] = [n, m]
                recomputed = True
            layer.beta = self.beta
            layer.sr_ste_lambda = lam
        if recomputed:
            self.last_recompute = step

    def pattern(self, layer: SparseLayer) -> dict[str, Any]:
        return {"kind": "nm", "n": layer.extra["target_n"], "m": layer.extra["target_m"],
                "input_dim": layer.input_dim}

    def _check_layer(self, layer: SparseLayer, value: torch.Tensor) -> None:
        n, m = layer.extra.get("current") or (layer.extra["target_n"], layer.extra["target_m"])
        groups = value.detach().movedim(layer.input_dim, -1).reshape(-1, m)
        counts = (groups != 0).sum(dim=1)
        bad = int((counts > n).sum())
        if bad:
            raise SparsityPatternError(
                f"{layer.name}: {bad} of {groups.shape[0]} groups of {m} along the input dim hold "
                f"more than {n} nonzeros (max {int(counts.max())})"
            )

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out["sparsity/beta"] = float(self.beta)
        if self.layers:
            first = next(iter(self.layers.values()))
            current = first.extra.get("current")
            if current is not None and self.step is not None and self.phase(self.step) != "dense":
                out["sparsity/n"], out["sparsity/m"] = float(current[0]), float(current[1])
        return out

    def _family_state(self) -> dict:
        return {"last_recompute": self.last_recompute, "beta": self.beta}

    def _load_family_state(self, state: dict) -> None:
        self.last_recompute = state["last_recompute"]
        self.beta = state["beta"]
        for layer in self.layers.values():
            layer.beta = self.beta
            layer.sr_ste_lambda = self.cfg.sr_ste_lambda if self.cfg.estimator == "sr_ste" else 0.0
