"""Which weights get sparsified: module types we know, name patterns, per-layer overrides.

A small table maps a module type to the dimension of its weight that runs along the input
(N:M groups run along it) and to a forward that takes the effective weight. Anything else is
never a candidate, so Hugging Face models work as soon as their linear type is in the table.
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.sparsity.config import SparsityConfig
from trainer.sparsity.errors import SparsityConfigError


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.bias is a {type(bias).__name__}, not a tensor")
    return bias


def _linear_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, _bias(module))


def _conv1d_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight [in, out], y = x @ W + b (always has a bias)
    bias = _bias(module)
    if bias is None:
        raise TypeError(f"{type(module).__name__} has no bias; transformers' Conv1D always has one")
    size_out = x.size()[:-1] + (weight.shape[1],)  # Conv1D's nf
    return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)


@dataclass(frozen=True)
class ModuleKind:
    input_dim: int  # weight dim that runs along the layer's input
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def module_kind(module: nn.Module) -> ModuleKind | None:
    """The table: nn.Linear (weight [out, in]) and transformers' Conv1D (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return ModuleKind(input_dim=1, forward=_linear_forward)
    hf = sys.modules.get("transformers.pytorch_utils")  # a model holding Conv1D has imported it
    if hf is not None and isinstance(module, hf.Conv1D):
        return ModuleKind(input_dim=0, forward=_conv1d_forward)
    return None


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Candidate modules -> weight shape as (out_features, in_features), whatever the storage
    layout. Works on a model built on the meta device (shapes only)."""
    shapes = {}
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        shape = tuple(module.weight.shape)
        shapes[name] = (shape[0], shape[1]) if kind.input_dim == 1 else (shape[1], shape[0])
    return shapes


def select_layers(cfg: SparsityConfig, names: list[str]) -> list[str]:
    """Module names chosen by include/exclude; raises when a pattern matches no candidate."""
    for key in ("include", "exclude"):
        for pattern in getattr(cfg, key):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise SparsityConfigError(
                    f"sparsity.{key} pattern {pattern!r} matches no linear layer; candidates are "
                    f"{_preview(names)}"
                )
    chosen = [
        n for n in names
        if any(fnmatch.fnmatchcase(n, p) for p in cfg.include)
        and not any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)
    ]
    if cfg.method != "dense" and not chosen:
        raise SparsityConfigError(
            f"sparsity.include={list(cfg.include)} minus exclude={list(cfg.exclude)} leaves no layer "
            f"to sparsify; candidates are {_preview(names)}"
        )
    for pattern in cfg.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in chosen):
            raise SparsityConfigError(
                f"sparsity.overrides pattern {pattern!r} matches no sparsified layer; sparsified "
                f"layers are {_preview(chosen)}"
            )
    return chosen


OVERRIDABLE = ("n", "m", "density")


def layer_override(cfg: SparsityConfig, name: str) -> dict[str, Any]:
    """The first override whose pattern matches `name` (empty when none)."""
    for pattern, values in cfg.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            values = dict(values)
            unknown = set(values) - set(OVERRIDABLE)
            if unknown:
                raise SparsityConfigError(
                    f"sparsity.overrides[{pattern!r}] has unknown keys {sorted(unknown)}; "
                    f"allowed: {list(OVERRIDABLE)}"
                )
            return values
    return {}


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
