"""Default sparsification targets: decoder-block projections only, for HF and built-in models."""
from __future__ import annotations

import pytest
import torch

from models import GPT, GPTConfig, ModelConfig, ModelConfigError, build_model
from models.sparsity_targets import (
    check_group_size, default_sparsity_targets, input_dim, match_sparsity_targets,
)


def test_llama_defaults(llama_dir):
    model, _ = build_model(ModelConfig(kind="hf", path=str(llama_dir)))
    assert default_sparsity_targets(model) == [
        f"model.layers.*.{p}" for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        )
    ]
    targets = match_sparsity_targets(model, default_sparsity_targets(model))
    assert len(targets) == 7 * model.config.num_hidden_layers
    assert all(input_dim(m) == 1 for m in targets.values())
    # GQA shapes: k/v project to fewer features than q
    assert targets["model.layers.0.self_attn.k_proj"].weight.shape[0] < targets["model.layers.0.self_attn.q_proj"].weight.shape[0]


def test_gpt2_defaults_and_conv1d_input_axis(gpt2_dir):
    model, _ = build_model(ModelConfig(kind="hf", path=str(gpt2_dir)))
    pats = default_sparsity_targets(model)
    assert pats == [f"transformer.h.*.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    targets = match_sparsity_targets(model, pats)
    assert "lm_head" not in targets and not any("wte" in n or "ln" in n for n in targets)
    fc = targets["transformer.h.0.mlp.c_fc"]
    assert input_dim(fc) == 0
    # Independent check that axis 0 is the input: y = x @ W + b for Conv1D.
    x = torch.randn(3, model.config.n_embd)
    torch.testing.assert_close(fc(x), x @ fc.weight + fc.bias)


def test_builtin_gpt_defaults():
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))
    pats = default_sparsity_targets(model)
    assert pats == ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"]
    targets = match_sparsity_targets(model, pats)
    assert sorted(targets) == sorted(f"h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert "lm_head" not in targets


def test_pattern_matching_nothing_is_an_error(llama_dir):
    model, _ = build_model(ModelConfig(kind="hf", path=str(llama_dir)))
    with pytest.raises(ModelConfigError, match=r"pattern 'h\.\*\.attn\.c_attn' matches no Linear/Conv1D"):
        match_sparsity_targets(model, ["model.layers.*.mlp.up_proj", "h.*.attn.c_attn"])
    # an embedding is not a projection either
    with pytest.raises(ModelConfigError, match="embed_tokens"):
        match_sparsity_targets(model, ["model.embed_tokens"])


def test_group_size_must_divide_input_dim(llama_dir):
    model, _ = build_model(ModelConfig(kind="hf", path=str(llama_dir)))
    targets = match_sparsity_targets(model, ["model.layers.0.mlp.down_proj"])  # input dim 128
    check_group_size(targets, 4)
    with pytest.raises(ModelConfigError, match=r"M=3 does not divide the input dimension 128 of layer 'model\.layers\.0\.mlp\.down_proj'"):
        check_group_size(targets, 3)
