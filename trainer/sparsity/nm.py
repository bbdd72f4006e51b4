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

from models.nm_pattern import nm_group_counts, parse_nm
from trainer.sparsity.base import Sparsifier, pruned_to_kept_norm
from trainer.sparsity.config import SparsityConfig, effective_estimator, sr_ste_decay
from trainer.sparsity.errors import SparsityConfigError, SparsityPatternError
from trainer.sparsity.masked_forward import SparseLayer
from trainer.sparsity.nm_backward import best_permutation, bidirectional_mask, transposable_mask
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


def _sdgf_stage(text: str) -> tuple[int, int]:
    try:
        return parse_nm(text)
    except ValueError as e:
        raise SparsityConfigError(f"sparsity.sdgf_stages entry {e}") from None


def sdgf_stages(n: int, m: int, schedule: str, custom: list[str] | None = None) -> list[tuple[int, int]]:
    """The N:M patterns of structure-decay gradient flow, in order (reference code's
    get_decay_config), always ending at the target N:M: sparsify (M-1):M, M/2:M, M/4:M, ... while
    above N, then N:M (3:8 -> 7:8, 4:8, 3:8; 1:16 -> 15:16, 8:16, 4:16, 2:16, 1:16); densify
    N:8M, N:4M, N:2M, N:M; fine 8N:8M, 4N:4M, 2N:2M, N:M; custom: the listed stages, which must
    end with the target (validate_sparsity_config refuses any other list)."""
    if schedule == "sparsify":
        stages = [(m - 1, m)]
        k = m // 2
        while k > n:
            if k < stages[-1][0]:
                stages.append((k, m))
            k //= 2
        if stages[-1] != (n, m):
            stages.append((n, m))
        return stages
    if schedule == "densify":
        return [(n, m * 2 ** (3 - i)) for i in range(4)]
    if schedule == "fine":
        return [(n * 2 ** (3 - i), m * 2 ** (3 - i)) for i in range(4)]
    if schedule == "custom":
        return [_sdgf_stage(s) for s in (custom or [])]
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
    """N:M with STE or SR-STE and optional progressive gradient flow.

    SR-STE comes in two forms (SparsityConfig.sr_ste_form). decoupled (default): after each
    optimizer step the pruned fp32 masters decay, W[~mask] *= 1 - lr_t * lambda_d, independent of
    grad_accum, precision and the optimizer's gradient normalisation. coupled (the paper's, for
    SGD): lambda_W * (1 - mask) * W / micro_batches is added to the gradient in backward, so the
    micro-batch average of the gradients carries it exactly once per step.

    Masks come from the fp32 masters: after each optimizer step the next step's mask is computed
    from the updated masters (through ParamAccess); only the very first step of a fresh run takes
    it from the module's weights (equal to the masters then).

    `sparsity.backward` (nm_backward.py): transposable replaces the forward mask by one that is N:M
    along both dims; bidirectional adds a backward mask (SparseLayer.backward_mask), recomputed
    with the forward mask, for the input-gradient GEMM.
    """

    method = "nm"

    def __init__(self, model, cfg: SparsityConfig, total_steps: int, layers: list[SparseLayer]):
        super().__init__(model, cfg, total_steps, layers)
        self.estimator = effective_estimator(cfg)
        self.dense_steps = int(cfg.dense_fraction * total_steps)
        self.fine_tune_start = total_steps - int(cfg.fine_tune_fraction * total_steps)
        self._perm_tensors: dict[str, tuple[list[int], torch.Tensor | None]] = {}
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
        self.prepared: int | None = None  # the step whose masks after_optimizer_step already set
        self.beta = 0.0  # MDGF beta of the step in force
        self.next_beta = 0.0  # of the prepared step
        self.pruned_to_kept: float | None = None

    @property
    def decoupled(self) -> bool:
        return self.estimator == "sr_ste" and self.cfg.sr_ste_form == "decoupled"

    @property
    def coupled_lambda(self) -> float:
        if self.estimator == "sr_ste" and self.cfg.sr_ste_form == "coupled":
            return self.cfg.sr_ste_lambda / max(1, self.micro_batches)
        return 0.0

    def decay_lambda(self) -> float:
        """lambda_d of the decoupled form (a constant per unit of lr; the step's lr scales it)."""
        return sr_ste_decay(self.cfg)

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
                    weight = full_weight(layer)
                    layer.mask = self._forward_mask(layer, weight, n, m)
                    layer.backward_mask = self._backward_mask(layer, weight, layer.mask, n, m, 0)
                    layer.extra["current"] = [n, m]
        super().attach()

    def _forward_mask(self, layer: SparseLayer, weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """The forward mask: N:M along the input dim, or transposable N:M (sparsity.backward)."""
        if self.cfg.backward == "transposable":
            return transposable_mask(weight, n, m)
        return nm_mask(weight, n, m, layer.input_dim)

    def _backward_mask(self, layer: SparseLayer, weight: torch.Tensor, forward_mask: torch.Tensor,
                       n: int, m: int, step: int) -> torch.Tensor | None:
        """bidirectional: Bi-Mask's M_b for `forward_mask` (output-dim permutation searched again
        every backward_permutation_interval steps); other modes: None (plain autograd)."""
        if self.cfg.backward != "bidirectional":
            return None
        output_dim = 1 - layer.input_dim
        last = layer.extra.get("backward_perm_step")
        if last is None or step - last >= self.cfg.backward_permutation_interval:
            index = list(self.layers).index(layer.name)
            # the same seed on every rank: the same permutation from the same masters
            generator = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + step * 1_009 + index)
            perm = best_permutation(weight, forward_mask, n, m, output_dim, self.cfg.backward_permutations, generator)
            layer.extra["backward_perm"] = perm.tolist()
            layer.extra["backward_perm_step"] = step
        return bidirectional_mask(weight, forward_mask, n, m, output_dim, self._permutation(layer))

    def _permutation(self, layer: SparseLayer) -> torch.Tensor | None:
        """layer.extra["backward_perm"] (a list: it is checkpointed) as a tensor, built once per
        search rather than every step; None for the identity (no gather / scatter needed)."""
        order = layer.extra["backward_perm"]
        cached = self._perm_tensors.get(layer.name)
        if cached is None or cached[0] is not order:
            identity = order == list(range(len(order)))
            cached = (order, None if identity else torch.tensor(order, dtype=torch.long))
            self._perm_tensors[layer.name] = cached
        return cached[1]

    def _prepare_masks(self, step: int, weight_of) -> None:
        """Masks and MDGF beta for `step` (into self.next_beta); `weight_of(layer)` gives the
        weights to rank."""
        phase = self.phase(step)
        if phase == "dense":
            for layer in self.layers.values():
                layer.mask = None
                layer.backward_mask = None
            self.next_beta = 0.0
            return
        flow = self.cfg.gradient_flow
        self.next_beta = (
            mdgf_beta(step, self.dense_steps, self.cfg.decay_coef, flow)
            if phase == "sparse" and flow in ("mdgf_linear", "mdgf_exp") else 0.0
        )
        due = self.last_recompute is None or step - self.last_recompute >= self.cfg.mask_interval
        recomputed = False
        for layer in self.layers.values():
            n, m = self.stage(layer, step)
            if due or layer.mask is None or [n, m] != layer.extra.get("current"):
                weight = weight_of(layer)
                forward_mask = self._forward_mask(layer, weight, n, m)
                backward_mask = self._backward_mask(layer, weight, forward_mask, n, m, step)
                device = layer.weight.device
                layer.record_mask(forward_mask.to(device))
                layer.backward_mask = None if backward_mask is None else backward_mask.to(device)
                layer.extra["current"] = [n, m]
                recomputed = True
        if recomputed:
            self.last_recompute = step

    def before_forward(self, step: int) -> None:
        if step == self.step:
            return  # another micro-batch of the same step
        self.step = step
        if self.prepared != step:  # first step of a fresh run: the working weights equal the masters
            self._prepare_masks(step, full_weight)
            self.prepared = step
        self.beta = self.next_beta
        for layer in self.layers.values():
            layer.beta = self.beta
            layer.sr_ste_lambda = self.coupled_lambda

    def after_optimizer_step(self, step: int, params) -> None:
        """Decoupled SR-STE decay of the pruned masters, then the next step's masks from the
        masters, then `pruned_to_kept_norm` (masters against the masks now in force)."""
        masks_used = {name: layer.mask for name, layer in self.layers.items()}
        masters: dict[str, torch.Tensor] = {}
        if self.decoupled and self.phase(step) != "dense":
            if self.lr is None:
                raise RuntimeError("NMSparsifier: decoupled SR-STE needs the step's lr; call "
                                   "set_step_context(lr, peak_lr, micro_batches) before each step")
            factor = 1.0 - self.lr * self.decay_lambda()
            for name, layer in self.layers.items():
                weight = params.get(name).float()
                mask_used = masks_used[name]
                if mask_used is None:  # before_forward(step) installs the masks of every sparse step
                    raise RuntimeError(f"NMSparsifier: {name} has no mask at sparse step {step}")
                mask = mask_used.to(weight.device)
                decayed = torch.where(mask, weight, weight * factor)
                params.set(name, decayed)
                masters[name] = decayed

        def master(layer: SparseLayer) -> torch.Tensor:
            if layer.name not in masters:
                weight = layer.weight
                if weight.dtype == torch.float32 and not hasattr(weight, "ds_id"):
                    # fp32 working copy, not partitioned (ZeRO 0-2): after the optimizer step it
                    # holds the masters' exact values; reading it saves a collective per layer.
                    masters[layer.name] = weight.detach()
                else:
                    masters[layer.name] = params.get(layer.name).float()
            return masters[layer.name]

        self._prepare_masks(step + 1, master)
        self.prepared = step + 1
        if self.phase(step + 1) != "dense":
            self.pruned_to_kept = pruned_to_kept_norm(
                (master(layer), layer.mask) for layer in self.layers.values()
            )

    def pattern(self, layer: SparseLayer) -> dict[str, Any]:
        """The N:M in force (the SDGF stage; the target once training reached it), plus the target."""
        n, m = layer.extra.get("current") or (layer.extra["target_n"], layer.extra["target_m"])
        out = {"kind": "nm", "n": int(n), "m": int(m), "input_dim": layer.input_dim}
        if self.cfg.backward == "transposable":  # N:M along the output dim as well
            out["transposable"] = True
            out["output_dim"] = 1 - layer.input_dim
        if (n, m) != (layer.extra["target_n"], layer.extra["target_m"]):
            out["target"] = f"{layer.extra['target_n']}:{layer.extra['target_m']}"
        return out

    def describe(self) -> dict[str, Any]:
        """What sparsity.json records beside the patterns: estimator, SR-STE form and strength,
        gradient flow and the stage in force."""
        out: dict[str, Any] = {"estimator": self.estimator, "gradient_flow": self.cfg.gradient_flow,
                               "backward": self.cfg.backward}
        if self.cfg.backward == "bidirectional":
            out["backward_permutations"] = int(self.cfg.backward_permutations)
            out["backward_permutation_interval"] = int(self.cfg.backward_permutation_interval)
        if self.estimator == "sr_ste":
            out["sr_ste_form"] = self.cfg.sr_ste_form
            if self.cfg.sr_ste_form == "decoupled":
                out["sr_ste_decay"] = self.decay_lambda()
            else:
                out["sr_ste_lambda"] = self.cfg.sr_ste_lambda
        if self.layers:
            first = next(iter(self.layers.values()))
            current = first.extra.get("current")
            if current is not None:
                out["stage"] = f"{current[0]}:{current[1]}"
        return out

    def _check_layer(self, layer: SparseLayer, value: torch.Tensor) -> None:
        n, m = layer.extra.get("current") or (layer.extra["target_n"], layer.extra["target_m"])
        dims = [("input", layer.input_dim)]
        if self.cfg.backward == "transposable":
            dims.append(("output", 1 - layer.input_dim))
        for label, dim in dims:
            counts = nm_group_counts(value, m, dim)
            bad = int((counts > n).sum())
            if bad:
                raise SparsityPatternError(
                    f"{layer.name}: {bad} of {counts.numel()} groups of {m} along the {label} dim hold "
                    f"more than {n} nonzeros (max {int(counts.max())})"
                )

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out["sparsity/beta"] = float(self.beta)
        out["sparsity/sr_ste"] = 1.0 if self.estimator == "sr_ste" else 0.0
        if self.decoupled:
            out["sparsity/sr_ste_decay"] = float(self.decay_lambda())
        if self.pruned_to_kept is not None:
            out["sparsity/pruned_to_kept_norm"] = float(self.pruned_to_kept)
        out["sparsity/backward_density"] = self.backward_density()
        if self.layers:
            first = next(iter(self.layers.values()))
            current = first.extra.get("current")
            if current is not None and self.step is not None and self.phase(self.step) != "dense":
                out["sparsity/n"], out["sparsity/m"] = float(current[0]), float(current[1])
                out["sparsity/stage"] = float(first.extra["stages"].index(list(current))) \
                    if list(current) in first.extra["stages"] else 0.0
            if self.beta > 0 and "sparsity/density" in out:
                # MDGF: the forward still uses the pruned weights at scale beta; the mass of the
                # effective weights is density + (1 - density) * beta of the dense one.
                d = out["sparsity/density"]
                out["sparsity/effective_density"] = d + (1.0 - d) * self.beta
            elif "sparsity/density" in out:
                out["sparsity/effective_density"] = out["sparsity/density"]
        return out

    def backward_density(self) -> float:
        """Non-zeros of the weights the input-gradient GEMM uses, over the sparsified layers' size:
        W . M_b (bidirectional), else the forward's W . M_f (1.0 while dense)."""
        total = active = 0
        for layer in self.layers.values():
            total += layer.numel
            used = layer.backward_mask if layer.backward_mask is not None else layer.mask
            active += layer.numel if used is None else int(used.sum())
        return active / total if total else 1.0

    def _family_state(self) -> dict:
        return {"last_recompute": self.last_recompute, "beta": self.beta, "prepared": self.prepared,
                "next_beta": self.next_beta, "pruned_to_kept": self.pruned_to_kept,
                "backward_masks": {name: None if layer.backward_mask is None else layer.backward_mask.detach().cpu().clone()
                                   for name, layer in self.layers.items()}}

    def _load_family_state(self, state: dict) -> None:
        self.last_recompute = state["last_recompute"]
        self.beta = state["beta"]
        self.prepared = state.get("prepared")
        self.next_beta = state.get("next_beta", self.beta)
        self.pruned_to_kept = state.get("pruned_to_kept")
        backward_masks = state.get("backward_masks", {})
        for name, layer in self.layers.items():
            saved = backward_masks.get(name)
            layer.backward_mask = None if saved is None else saved.to(layer.weight.device)
        for layer in self.layers.values():
            layer.beta = self.beta
            layer.sr_ste_lambda = self.coupled_lambda
