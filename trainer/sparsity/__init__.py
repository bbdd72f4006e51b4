"""Sparse-training methods inside the trainer, behind one small interface (`Sparsifier`).

    cfg = SparsityConfig(method="nm", n=2, m=4)            # or Hydra: sparsity=nm sparsity.n=2 ...
    validate_sparsity_config(cfg, module_shapes(meta_model))  # at config load, before any actor
    check_sparsity_for_job(cfg, pretrained=..., peak_lr=...)  # init=magnitude needs pretrained weights
    sparsifier = build_sparsifier(model, cfg, total_steps, pretrained=...)
    sparsifier.attach()                                    # before the optimizer / DeepSpeed
    for step in range(start, total_steps):                 # step = optimizer steps already taken
        sparsifier.set_step_context(lr_t, peak_lr, grad_accum)  # decoupled SR-STE decays by lr_t
        sparsifier.before_forward(step)                    # every micro-batch (idempotent per step)
        loss.backward(); optimizer.step()
        sparsifier.after_optimizer_step(step, params)      # params: a ParamAccess over the masters
    sparsifier.metrics(); sparsifier.state_dict(); sparsifier.masked_state_dict(model.state_dict())

One file per family: nm.py (N:M, STE/SR-STE, progressive gradient flow) with nm_backward.py (N:M
in the backward pass), dynamic.py (SET, RigL, static, ERK), magnitude.py (gradual magnitude
pruning), scl.py (learned masks), dense.py. masked_forward.py holds the
autograd Function, layers.py which modules can be sparsified and how patterns select them.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

from models.checks import check_settings
from models.sparsity_targets import projection_weight

from trainer.sparsity.base import ParamAccess, Sparsifier, TorchParamAccess
from trainer.sparsity.config import (
    BACKWARD_MODES, DISTRIBUTIONS, DROP_SCHEDULES, ESTIMATORS, GRADIENT_FLOWS, INIT_SCALES, INITS, METHODS, SDGF_SCHEDULES,
    SR_STE_FORMS, SparsityConfig, effective_distribution, effective_estimator, effective_init, sr_ste_decay,
)
from trainer.sparsity.dense import DenseSparsifier
from trainer.sparsity.dynamic import DynamicSparsifier, erk_densities
from trainer.sparsity.errors import SparsityConfigError, SparsityPatternError, SparsityStateError
from trainer.sparsity.layers import layer_override, module_kind, module_shapes, select_layers
from trainer.sparsity.magnitude import MagnitudeSparsifier
from trainer.sparsity.masked_forward import SparseLayer
from trainer.sparsity.nm import NMSparsifier, sdgf_stages
from trainer.sparsity.scl import SCLSparsifier

__all__ = [
    "SparsityConfig", "SparsityConfigError", "SparsityPatternError", "SparsityStateError",
    "Sparsifier", "ParamAccess", "TorchParamAccess", "validate_sparsity_config",
    "build_sparsifier", "module_shapes", "layer_densities", "check_sparsity_for_job",
    "effective_estimator", "effective_init", "effective_distribution",
]


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise SparsityConfigError(f"sparsity.{key}={value!r}; expected one of {list(allowed)}")


def _fraction(value: float, key: str, low_open: bool = False) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise SparsityConfigError(
            f"sparsity.{key}={value!r}; expected a value in {'(0, 1]' if low_open else '[0, 1]'}"
        )


def _check_nm(n: int, m: int, where: str, in_features: int | None = None) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or n < 1 or m < 2 or n >= m:
        raise SparsityConfigError(f"{where}: N:M = {n}:{m}; expected integers with 1 <= N < M")
    if in_features is not None and in_features % m:
        raise SparsityConfigError(
            f"{where}: M={m} does not divide the layer's input dimension {in_features}"
        )


def validate_sparsity_config(
    cfg: SparsityConfig, module_shapes_or_model: Mapping[str, tuple[int, ...]] | nn.Module
) -> None:
    """Raise SparsityConfigError naming the field/layer for any config that cannot work on this
    model. `module_shapes_or_model`: module name -> (out_features, in_features) of every
    candidate (see `module_shapes`, works on a meta-device model), or the model itself."""
    shapes = (
        module_shapes(module_shapes_or_model) if isinstance(module_shapes_or_model, nn.Module)
        else dict(module_shapes_or_model)
    )
    _choice(cfg.method, METHODS, "method")
    _choice(cfg.estimator, ESTIMATORS, "estimator")
    _choice(cfg.gradient_flow, GRADIENT_FLOWS, "gradient_flow")
    _choice(cfg.sdgf_schedule, SDGF_SCHEDULES, "sdgf_schedule")
    _choice(cfg.distribution, DISTRIBUTIONS, "distribution")
    _choice(cfg.init, INITS, "init")
    _choice(cfg.sr_ste_form, SR_STE_FORMS, "sr_ste_form")
    _choice(cfg.drop_schedule, DROP_SCHEDULES, "drop_schedule")
    _choice(cfg.init_scale, INIT_SCALES, "init_scale")
    _choice(cfg.backward, BACKWARD_MODES, "backward")
    if cfg.backward != "exact" and cfg.method != "nm":
        raise SparsityConfigError(
            f"sparsity.backward={cfg.backward!r} applies to method=nm only (this run: method={cfg.method!r}); "
            f"leave it at 'exact'"
        )
    if cfg.method == "dense":
        return
    check_settings(SparsityConfigError, [
        *[(int(getattr(cfg, key)) >= 1, f"sparsity.{key}={getattr(cfg, key)!r}; expected an integer >= 1")
          for key in ("mask_interval", "update_interval", "prune_interval", "backward_permutation_interval")],
        *[(getattr(cfg, key) >= 0, f"sparsity.{key}={getattr(cfg, key)!r}; expected a value >= 0")
          for key in ("sr_ste_lambda", "decay_coef", "erk_power_scale")],
        (int(cfg.backward_permutations) >= 0,
         f"sparsity.backward_permutations={cfg.backward_permutations!r}; expected an integer >= 0"),
    ])
    if cfg.backward != "exact" and cfg.gradient_flow != "none":
        raise SparsityConfigError(
            f"sparsity.backward={cfg.backward!r} with gradient_flow={cfg.gradient_flow!r}: the backward-pass "
            f"N:M methods are defined for plain N:M (STE/SR-STE); use gradient_flow=none or backward=exact"
        )
    if cfg.sr_ste_lambda >= 1:
        raise SparsityConfigError(f"sparsity.sr_ste_lambda={cfg.sr_ste_lambda!r}; expected a value in [0, 1) "
                                  f"(the paper's is 2e-4)")
    if cfg.sr_ste_decay is not None and cfg.sr_ste_decay < 0:
        raise SparsityConfigError(f"sparsity.sr_ste_decay={cfg.sr_ste_decay!r}; expected null or a value >= 0")
    if cfg.gradient_flow == "mdgf_linear" and cfg.decay_coef > 1:
        raise SparsityConfigError(f"sparsity.decay_coef={cfg.decay_coef!r}; expected a value in [0, 1] for "
                                  f"mdgf_linear (beta = 1 - c t would reach 0 within the first step)")
    for key in ("dense_fraction", "fine_tune_fraction", "drop_fraction", "end_fraction",
                "prune_start_fraction", "prune_end_fraction", "initial_sparsity"):
        _fraction(getattr(cfg, key), key)
    _fraction(cfg.density, "density", low_open=True)
    if cfg.method == "scl":
        _check_scl(cfg)
    if cfg.dense_fraction + cfg.fine_tune_fraction >= 1.0:
        raise SparsityConfigError(
            f"sparsity.dense_fraction + fine_tune_fraction = {cfg.dense_fraction + cfg.fine_tune_fraction}; "
            f"expected < 1 (no sparse phase left)"
        )
    if cfg.method == "magnitude":
        if cfg.prune_start_fraction >= cfg.prune_end_fraction:
            raise SparsityConfigError(
                f"sparsity.prune_start_fraction={cfg.prune_start_fraction} must be < "
                f"prune_end_fraction={cfg.prune_end_fraction}"
            )
        if cfg.initial_sparsity > 1.0 - cfg.density:
            raise SparsityConfigError(
                f"sparsity.initial_sparsity={cfg.initial_sparsity} exceeds the target sparsity "
                f"1 - density = {1.0 - cfg.density}"
            )
    if cfg.gradient_flow != "none" and cfg.method != "nm":
        raise SparsityConfigError(f"sparsity.gradient_flow={cfg.gradient_flow!r} applies to method=nm only")
    if cfg.method == "nm":
        _check_nm(cfg.n, cfg.m, "sparsity.n/m")
    chosen = select_layers(cfg, list(shapes))
    for name in chosen:
        override = layer_override(cfg, name)
        in_features = shapes[name][1]
        if cfg.method == "nm":
            n, m = override.get("n", cfg.n), override.get("m", cfg.m)
            where = f"layer {name}" + (" (sparsity.overrides)" if override else "")
            _check_nm(n, m, where, in_features)
            out_features = shapes[name][0]
            if cfg.backward != "exact" and out_features % m:
                what = ("M x M blocks (N per row and column)" if cfg.backward == "transposable"
                        else "groups of M along the output dimension")
                raise SparsityConfigError(
                    f"{where}: sparsity.backward={cfg.backward} needs {what}, but M={m} does not divide "
                    f"the layer's output dimension {out_features} (weight {out_features}x{in_features})"
                )
            if cfg.gradient_flow == "sdgf":
                stages = sdgf_stages(n, m, cfg.sdgf_schedule, cfg.sdgf_stages)
                if not stages:
                    raise SparsityConfigError("sparsity.sdgf_schedule=custom needs sparsity.sdgf_stages, e.g. ['4:8', '1:8']")
                if stages[-1] != (n, m):
                    raise SparsityConfigError(
                        f"{where}: sparsity.gradient_flow=sdgf with sdgf_stages={list(cfg.sdgf_stages)} ends at "
                        f"{stages[-1][0]}:{stages[-1][1]}, not the target {n}:{m}; the last stage must be the target"
                    )
                for sn, sm in stages:
                    _check_nm(sn, sm, f"layer {name}, SDGF stage {sn}:{sm} (sdgf_schedule={cfg.sdgf_schedule})", in_features)
        elif "density" in override:
            if cfg.method == "scl":
                raise SparsityConfigError(
                    f"sparsity.overrides density for layer {name}: method=scl learns each layer's density "
                    f"(only the overall sparsity.density is steered); remove the override"
                )
            _fraction(override["density"], f"overrides[{name}].density", low_open=True)


def _check_scl(cfg: SparsityConfig) -> None:
    """SCL's own keys, and that its density target can be reached before the masks freeze."""
    if cfg.density >= 1.0:
        raise SparsityConfigError(f"sparsity.density={cfg.density!r}; method=scl needs a target below 1")
    for key in ("scl_controller_gain", "scl_mask_lr", "scl_mask_init"):
        if not getattr(cfg, key) > 0:
            raise SparsityConfigError(f"sparsity.{key}={getattr(cfg, key)!r}; expected a value > 0")
    if cfg.scl_lambda is not None and cfg.scl_lambda < 0:
        raise SparsityConfigError(f"sparsity.scl_lambda={cfg.scl_lambda!r}; expected null (controller) or >= 0")
    if cfg.end_fraction <= 0 or cfg.end_fraction > 1.0 - cfg.fine_tune_fraction:
        raise SparsityConfigError(
            f"sparsity.end_fraction={cfg.end_fraction} with fine_tune_fraction={cfg.fine_tune_fraction}: the SCL "
            f"density target cannot be reached: the schedule reaches sparsity.density at end_fraction, which must "
            f"be in (0, 1 - fine_tune_fraction] (the masks freeze at 1 - fine_tune_fraction)"
        )


def layer_densities(cfg: SparsityConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Density of each sparsified layer: uniform or ERK over the layers without an override;
    a `density` override fixes that layer's density (the ERK budget covers the others)."""
    fixed = {n: layer_override(cfg, n)["density"] for n in shapes if "density" in layer_override(cfg, n)}
    rest = {n: s for n, s in shapes.items() if n not in fixed}
    if effective_distribution(cfg) == "erk" and rest:
        densities = erk_densities(rest, cfg.density, cfg.erk_power_scale)
    else:
        densities = {n: cfg.density for n in rest}
    densities.update(fixed)
    return densities


def check_sparsity_for_job(cfg: SparsityConfig, *, pretrained: bool, peak_lr: float) -> None:
    """Checks that need the job around the model: `pretrained` (the job starts from pretrained
    weights: model=hf or a resumed checkpoint) and the optimizer's peak lr."""
    if cfg.method in ("rigl", "set", "static"):
        if cfg.init == "magnitude" and not pretrained:
            raise SparsityConfigError(
                "sparsity.init=magnitude ranks pretrained weights, but this job starts from a random "
                "initialisation (model.kind=gpt, no resume); use init=random or auto, or model=hf"
            )
        if cfg.init_scale == "fan_in" and pretrained:
            raise SparsityConfigError(
                "sparsity.init_scale=fan_in rescales a fresh initialisation; this job starts from "
                "pretrained weights (model=hf without from_scratch, or resume), which it would distort; use init_scale=none"
            )
    if cfg.method == "nm" and effective_estimator(cfg) == "sr_ste" and cfg.sr_ste_form == "decoupled":
        per_step = peak_lr * sr_ste_decay(cfg)
        if not 0 <= per_step < 1:
            raise SparsityConfigError(
                f"sparsity.sr_ste_decay={cfg.sr_ste_decay!r}: optimizer.lr * sr_ste_decay = {per_step:g}; "
                f"expected < 1 (the pruned weights decay by that fraction per step)"
            )


def build_sparsifier(model: nn.Module, cfg: SparsityConfig, total_steps: int,
                     pretrained: bool = False) -> Sparsifier:
    """Validate `cfg` against `model` and build its method's Sparsifier (call attach() next).
    `pretrained`: the model holds pretrained weights (sparsity.init=auto ranks them)."""
    if int(total_steps) < 1:
        raise SparsityConfigError(f"total_steps={total_steps!r}; expected >= 1")
    validate_sparsity_config(cfg, model)
    if cfg.method == "dense":
        return DenseSparsifier(model, cfg, total_steps, [])
    modules = dict(model.named_modules())
    chosen = select_layers(cfg, list(module_shapes(model)))
    layers = []
    for module_name in chosen:
        module = modules[module_name]
        override = layer_override(cfg, module_name)
        kind = module_kind(module)
        if kind is None:  # select_layers picks among module_shapes' modules, which all have a kind
            raise SparsityConfigError(f"sparsity target {module_name!r} is not a layer type that can be sparsified")
        layer = SparseLayer(
            name=f"{module_name}.weight" if module_name else "weight", module_name=module_name,
            module=module, kind=kind, shape=tuple(projection_weight(module).shape),
        )
        layer.extra["target_n"] = int(override.get("n", cfg.n))
        layer.extra["target_m"] = int(override.get("m", cfg.m))
        layers.append(layer)
    if cfg.method == "nm":
        return NMSparsifier(model, cfg, total_steps, layers)
    if cfg.method == "scl":
        if int(cfg.end_fraction * total_steps) < 1:
            raise SparsityConfigError(
                f"sparsity.end_fraction={cfg.end_fraction} of {total_steps} steps leaves no step to reach the SCL "
                f"density target"
            )
        return SCLSparsifier(model, cfg, total_steps, layers, pretrained=pretrained)
    # overrides match module names; the methods key densities by parameter name
    module_densities = layer_densities(cfg, {layer.module_name: layer.shape for layer in layers})
    densities = {layer.name: module_densities[layer.module_name] for layer in layers}
    if cfg.method == "magnitude":
        return MagnitudeSparsifier(model, cfg, total_steps, layers, densities)
    return DynamicSparsifier(model, cfg, total_steps, layers, densities, pretrained=pretrained)
