"""What a model costs: multiply-accumulate FLOPs per token and its parameter count.

`flops_per_token` counts every matmul a token costs in the forward pass, as 2 FLOPs per
multiply-add: each nn.Linear (transformers' Conv1D too) at its weight's nonzero fraction
(`densities`, parameter name -> density; absent: dense), and the attention-score GEMMs, QK^T and
the attention-weighted sum of V, each 2 * d_attn * context per layer, with the causal context
averaged over a training window of `seq_len` tokens, (seq_len + 1) / 2; d_attn is query heads x
head dim (grouped-query attention shares keys and values between query heads, not the score
products; its smaller k_proj / v_proj are counted at their own shapes). Sparse-IFT's modules
(models/sparse_ift.py) are built of nn.Linear parts, each counted at its density. The head is a linear
layer and counted as one (a tied head too). Embedding lookups, norms, activations, softmax and
biases are not matmuls and not counted. The backward pass costs about twice the forward for the
same matmuls, so ratios between models are the same for training.
"""
from __future__ import annotations

import sys

import torch.nn as nn


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear layer, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and isinstance(module, hf.Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def attention_shape(model: nn.Module) -> tuple[int, int]:
    """(layers, attention width = heads x head dim) of the built-in GPT or an HF decoder."""
    # The built-in GPTConfig or any transformers config: its field names depend on the family.
    cfg = getattr(model, "config")
    if hasattr(cfg, "n_layer") and hasattr(cfg, "n_embd"):  # built-in GPT, GPT-2
        return int(cfg.n_layer), int(cfg.n_embd)
    layers = int(cfg.num_hidden_layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return layers, int(cfg.num_attention_heads * head_dim)


def flops_per_token(model: nn.Module, seq_len: int, densities: dict[str, float] | None = None) -> int:
    """Forward FLOPs per token (see the module docstring); works on a meta-device model."""
    densities = densities or {}
    total = 0.0
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None:
            continue
        weight_name = f"{name}.weight" if name else "weight"
        total += 2.0 * shape[0] * shape[1] * float(densities.get(weight_name, 1.0))
    layers, width = attention_shape(model)
    context = (seq_len + 1) / 2.0
    total += layers * 2 * (2.0 * width * context)
    return int(round(total))


def params_total(model: nn.Module) -> int:
    """Every parameter element once (tied weights once), sparse or not."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", p.numel()))
    return total
