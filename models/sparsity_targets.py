"""Which layers of a model are sparsified, by module-name patterns (fnmatch, `*` crosses dots).

Default: the projections inside the repeated decoder blocks (attention and MLP); embeddings,
lm_head and norms stay dense. The patterns are derived from the model's own module names, so
one rule covers the built-in GPT and HF families:

    built-in GPT:  h.*.attn.c_attn, h.*.attn.c_proj, h.*.mlp.c_fc, h.*.mlp.c_proj
    Llama/Qwen/Mistral:  model.layers.*.self_attn.{q,k,v,o}_proj, model.layers.*.mlp.{gate,up,down}_proj
    GPT-2:  transformer.h.*.attn.c_attn, transformer.h.*.attn.c_proj, transformer.h.*.mlp.c_fc,
            transformer.h.*.mlp.c_proj  (transformers Conv1D: weight [in, out])

N:M groups run along a layer's INPUT dimension: `input_dim(module)` says which axis of
`module.weight` that is (1 for nn.Linear's [out, in], 0 for Conv1D's [in, out]).
"""
from __future__ import annotations

import fnmatch
import re

import torch
import torch.nn as nn

from models.build import ModelConfigError

# MoE routers are projections inside blocks too, but they pick experts: keep them dense.
_DENSE_LAST_NAMES = {"gate", "router"}
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: only the built-in GPT exists
        return None
    return Conv1D


def is_projection(module: nn.Module) -> bool:
    """True for the layer types the sparsity methods handle: nn.Linear and transformers' Conv1D."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def input_dim(module: nn.Module) -> int:
    """Axis of `module.weight` that runs over input features (N:M groups lie along it)."""
    if isinstance(module, nn.Linear):
        return 1
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return 0
    raise ModelConfigError(f"{type(module).__name__} is not a Linear or Conv1D projection")


def projection_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight` of a projection; ModelConfigError when the module holds no weight tensor."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ModelConfigError(f"{type(module).__name__} has no weight tensor")
    return weight


def default_sparsity_targets(model: nn.Module) -> list[str]:
    """fnmatch patterns of the projections inside the model's repeated blocks, in module order.
    A name is "inside a block" when it contains a layer index (`h.3.`, `layers.3.`)."""
    patterns: list[str] = []
    for name, module in model.named_modules():
        if not is_projection(module) or not _LAYER_INDEX.search(name):
            continue
        if name.rsplit(".", 1)[-1] in _DENSE_LAST_NAMES:
            continue
        pattern = _LAYER_INDEX.sub(".*", name)
        if pattern not in patterns:
            patterns.append(pattern)
    if not patterns:
        raise ModelConfigError(
            f"{type(model).__name__}: found no Linear/Conv1D projection inside numbered blocks; "
            "give sparsity target patterns explicitly"
        )
    return patterns


def match_sparsity_targets(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """{module name: module} for every projection matched by some pattern (fnmatch on module
    names). Raises ModelConfigError naming a pattern that matches no projection of the model."""
    projections = {n: m for n, m in model.named_modules() if is_projection(m)}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = [n for n in projections if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ModelConfigError(
                f"sparsity target pattern {pattern!r} matches no Linear/Conv1D module of "
                f"{type(model).__name__} (e.g. {', '.join(list(projections)[:4])})"
            )
        chosen.update((n, projections[n]) for n in hits)
    return {n: projections[n] for n in projections if n in chosen}  # module order


def check_group_size(targets: dict[str, nn.Module], m: int) -> None:
    """Raise ModelConfigError when M does not divide a chosen layer's input dimension."""
    for name, module in targets.items():
        size = projection_weight(module).shape[input_dim(module)]
        if size % m:
            raise ModelConfigError(
                f"N:M group size M={m} does not divide the input dimension {size} of layer {name!r}"
            )
