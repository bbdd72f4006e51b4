"""The one interface every sparse-training method implements, and how methods reach weights.

Call order inside a trainer (see trainer/sparsity/README in the module docstring of
trainer/sparsity/__init__.py):

    sparsifier = build_sparsifier(model, cfg, total_steps)   # before the optimizer/DeepSpeed
    sparsifier.attach()
    for step in range(start, total_steps):       # `step` = optimizer steps already taken
        sparsifier.before_forward(step)          # every micro-batch; idempotent per step
        loss = ...; loss.backward()              # masks/SR-STE/gradient capture act in backward
        optimizer.step()
        sparsifier.after_optimizer_step(step, params)   # DST regrowth, magnitude pruning
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from trainer.sparsity.config import SparsityConfig
from trainer.sparsity.errors import SparsityPatternError, SparsityStateError
from trainer.sparsity.masked_forward import SparseLayer, patch_forward, unpatch_forward


@runtime_checkable
class ParamAccess(Protocol):
    """How a method reads and writes MASTER weights and optimizer state (names as in
    model.named_parameters()). DeepSpeed keeps fp32 masters inside its optimizer; the trainer
    provides an implementation over deepspeed.utils.safe_get/set_full_fp32_param."""

    def get(self, name: str) -> torch.Tensor:
        """The full fp32 master of `name` (treat as read-only)."""
        ...

    def set(self, name: str, value: torch.Tensor) -> None:
        ...

    def reset_optimizer_state(self, name: str, positions: torch.Tensor) -> None:
        """Zero the optimizer's per-element state (Adam moments) of `name` where positions is True."""
        ...


class TorchParamAccess:
    """ParamAccess for a plain torch model and a torch.optim optimizer (the params are the masters)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.params = dict(model.named_parameters())
        self.optimizer = optimizer

    def get(self, name: str) -> torch.Tensor:
        return self.params[name].detach()

    def set(self, name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.params[name].copy_(value)

    def reset_optimizer_state(self, name: str, positions: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        param = self.params[name]
        for value in self.optimizer.state.get(param, {}).values():
            # per-element state (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer); not `step`
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(positions.to(value.device), 0)


class Sparsifier:
    """Base class: holds the sparsified layers, patches their forwards, reports metrics and state.

    Subclasses set masks and per-layer flags in `before_forward` / `after_optimizer_step`.
    """

    method = "base"

    def __init__(self, model: nn.Module, cfg: SparsityConfig, total_steps: int, layers: list[SparseLayer]):
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.layers: dict[str, SparseLayer] = {layer.name: layer for layer in layers}
        self.step: int | None = None  # the step before_forward last prepared
        self.attached = False
        # set by the trainer before each optimizer step (set_step_context)
        self.lr: float | None = None
        self.peak_lr: float | None = None
        self.micro_batches = 1
        seen: set[int] = set()
        self.model_numel = 0  # every parameter once (tied weights once), for the whole-model density
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                self.model_numel += int(getattr(p, "ds_numel", p.numel()))

    # --- the interface -------------------------------------------------------------------
    def attach(self) -> None:
        for layer in self.layers.values():
            patch_forward(layer)
        self.attached = True

    def detach(self) -> None:
        for layer in self.layers.values():
            unpatch_forward(layer)
        self.attached = False

    def set_step_context(self, lr: float, peak_lr: float, micro_batches: int) -> None:
        """What the coming optimizer step does: its learning rate lr_t, the schedule's peak lr
        (optimizer.lr) and how many micro-batches' gradients it averages (grad_accum). Call once
        per step, before its first before_forward."""
        self.lr, self.peak_lr, self.micro_batches = float(lr), float(peak_lr), int(micro_batches)

    def before_forward(self, step: int) -> None:
        self.step = step

    def after_optimizer_step(self, step: int, params: ParamAccess) -> None:
        pass

    def on_rl_start(self) -> None:
        """The RL phase of launch.rl begins (after any SFT warm-up); methods with learned masks
        may freeze them here (SCL: sparsity.scl_freeze_in_rl)."""

    @property
    def sparsified(self) -> dict[str, dict[str, Any]]:
        """Parameter name -> its pattern, e.g. {"kind": "nm", "n": 2, "m": 4, "input_dim": 1}
        or {"kind": "unstructured", "density": 0.1}; what export writes to sparsity.json."""
        return {name: self.pattern(layer) for name, layer in self.layers.items()}

    def pattern(self, layer: SparseLayer) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Method settings in force that sparsity.json records beside the patterns."""
        return {}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        total = active = sad = sad_total = since = ever = 0
        for name, layer in self.layers.items():
            numel = layer.numel
            n_active = numel if layer.mask is None else int(layer.mask.sum())
            out[f"sparsity/density/{name}"] = n_active / numel
            total += numel
            active += n_active
            if layer.initial_mask is not None:
                ever_flipped, layer_sad, layer_sad_total = layer.flip_history()
                sad += int(layer_sad)
                sad_total += int(layer_sad_total)
                ever += int(ever_flipped.sum())
                if layer.mask is not None:
                    since += int((layer.mask ^ layer.initial_mask).sum())
        if self.model_numel:
            out["sparsity/model_density"] = (self.model_numel - (total - active)) / self.model_numel
        if total:
            out["sparsity/density"] = active / total
            out["sparsity/sad"] = float(sad)
            out["sparsity/sad_normalized"] = sad / total
            out["sparsity/sad_since_start"] = float(since)
            out["sparsity/sad_since_start_normalized"] = since / total
            out["sparsity/sad_cumulative"] = float(sad_total)
            out["sparsity/sad_cumulative_normalized"] = sad_total / total
            out["sparsity/ever_flipped"] = ever / total
        else:
            out["sparsity/density"] = 1.0
        return out

    def masked_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of `state` where every sparsified weight is W * mask (pruned entries exactly 0)."""
        out = dict(state)
        for name, layer in self.layers.items():
            if name in out and layer.mask is not None:
                value = out[name]
                out[name] = value * layer.mask.to(value.device)
        return out

    def check_pattern(self, state: dict[str, torch.Tensor]) -> None:
        """Raise SparsityPatternError when a sparsified weight in `state` violates its pattern."""
        for name, layer in self.layers.items():
            if name in state:
                self._check_layer(layer, state[name])

    def _check_layer(self, layer: SparseLayer, value: torch.Tensor) -> None:
        raise NotImplementedError

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()

        return {
            "method": self.method,
            "step": self.step,
            "layers": {
                name: {
                    "mask": cpu(layer.mask),
                    "initial_mask": cpu(layer.initial_mask),
                    "ever_flipped": cpu(layer.ever_flipped),
                    "sad_last": cpu(layer.sad_last),
                    "sad_total": cpu(layer.sad_total),
                    "extra": dict(layer.extra),
                }
                for name, layer in self.layers.items()
            },
            "family": self._family_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("method") != self.method:
            raise SparsityStateError(
                f"sparsifier state is for method {sd.get('method')!r}, this run uses {self.method!r}"
            )
        saved = sd["layers"]
        if set(saved) != set(self.layers):
            raise SparsityStateError(
                f"sparsifier state holds layers {sorted(set(saved) ^ set(self.layers))[:6]} that "
                f"differ from this model's sparsified layers"
            )
        for name, layer in self.layers.items():
            entry = saved[name]
            mask = entry["mask"]
            if mask is not None and tuple(mask.shape) != layer.shape:
                raise SparsityStateError(
                    f"sparsifier state mask of {name} has shape {tuple(mask.shape)}, expected {layer.shape}"
                )
            device = layer.weight.device
            to = (lambda t: None if t is None else t.to(device))  # noqa: E731
            layer.mask = to(mask)
            layer.initial_mask = to(entry["initial_mask"])
            layer.ever_flipped = to(entry["ever_flipped"])
            layer.sad_last = to(entry["sad_last"])
            layer.sad_total = to(entry["sad_total"])
            layer.extra = dict(entry["extra"])
        self.step = sd["step"]
        self._load_family_state(sd["family"])

    def _family_state(self) -> dict:
        return {}

    def _load_family_state(self, state: dict) -> None:
        pass


def check_unstructured(layer: SparseLayer, value: torch.Tensor, active: int) -> None:
    """A DST/static/pruned weight: nonzeros only where the mask is on, at most `active` of them."""
    nonzero = int(torch.count_nonzero(value))
    if nonzero > active:
        raise SparsityPatternError(
            f"{layer.name}: {nonzero} nonzero weights, the layer's budget is {active} "
            f"(density {active / layer.numel:.4f})"
        )
    if layer.mask is not None:
        outside = int(torch.count_nonzero(value * ~layer.mask.to(value.device)))
        if outside:
            raise SparsityPatternError(f"{layer.name}: {outside} nonzero weights outside the mask")


def zero_inactive(layer: SparseLayer, params: ParamAccess) -> None:
    """Set the master weight and optimizer moments to 0 where the layer's mask is off."""
    weight = params.get(layer.name)
    mask = layer.current_mask().to(weight.device)
    params.set(layer.name, weight * mask)
    params.reset_optimizer_state(layer.name, ~mask)


def pruned_to_kept_norm(weights_and_masks) -> float:
    """||W * (1 - mask)|| / ||W * mask|| over all given (fp32 master, bool mask) pairs together."""
    pruned = kept = 0.0
    for weight, mask in weights_and_masks:
        w = weight.float()
        m = mask.to(w.device)
        kept += float(torch.where(m, w, 0).pow(2).sum())
        pruned += float(torch.where(m, 0, w).pow(2).sum())
    return (pruned ** 0.5) / (kept ** 0.5) if kept > 0 else 0.0
