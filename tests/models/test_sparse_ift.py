"""Sparse-IFT (models/sparse_ift.py) and the cost counters (models/flops.py): iso-FLOP against a
hand count of the dense GPT, the transformed layers against hand-built matmuls, config errors."""
from __future__ import annotations

import fnmatch

import pytest
import torch
import torch.nn as nn

from launch.config import compose_pretrain_config, validate_pretrain_config
from models.export import export_gpt_directory, load_gpt_directory
from models.flops import flops_per_token, params_total
from models.gpt import GPT, GPTConfig
from models.sparse_ift import (
    DopedLinear, FactorizedLinear, ParallelLinear, SparseIFTConfigError, doped_rank, factorized_rank,
    sparse_module_patterns,
)

D, L, V, T = 128, 4, 259, 128


def dense_flops_by_hand(d: int = D, layers: int = L, vocab: int = V, seq: int = T) -> float:
    """2 FLOPs per multiply-add: per layer c_attn 3d^2, c_proj d^2, c_fc 4d^2, MLP c_proj 4d^2, QK^T and
    AV d * (seq + 1) / 2 each; the head d * vocab."""
    return layers * 2 * (12 * d * d + 2 * d * (seq + 1) / 2) + 2 * d * vocab


def _meta_gpt(kind: str = "none", s: float = 0.0) -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig(n_layer=L, n_head=4, n_embd=D, block_size=256, sparse_ift=kind, sparse_ift_sparsity=s))


def _sparse_densities(model: GPT, kind: str, s: float) -> dict[str, float]:
    patterns = sparse_module_patterns(kind)
    return {f"{name}.weight": 1.0 - s for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def test_dense_counts_match_the_hand_formulas():
    model = _meta_gpt()
    assert flops_per_token(model, T) == pytest.approx(dense_flops_by_hand(), abs=1)
    # wte (the tied head) + wpe + per layer: 2 LayerNorms, c_attn, c_proj, c_fc, c_proj with biases; ln_f
    per_layer = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    assert params_total(model) == V * D + 256 * D + L * per_layer + 2 * D


@pytest.mark.parametrize("kind, s", [("wide", 0.5), ("wide", 0.75), ("wide", 0.9), ("parallel", 0.5),
                                     ("parallel", 0.75), ("factorized", 0.75), ("doped", 0.5), ("doped", 0.75)])
def test_every_kind_is_iso_flop_and_adds_parameters(kind, s):
    model = _meta_gpt(kind, s)
    densities = _sparse_densities(model, kind, s)
    assert densities, "the patterns select the sparse parts"
    # rounding of widths and ranks: a few units in hundreds of columns
    assert flops_per_token(model, T, densities) == pytest.approx(dense_flops_by_hand(), rel=0.01)
    assert params_total(model) > params_total(_meta_gpt())


def test_ranks_are_the_smallest_or_largest_iso_flop_ones():
    for d_in, d_out, s in [(128, 384, 0.75), (512, 128, 0.5), (128, 128, 0.9)]:
        r = factorized_rank(d_in, d_out, s)  # the smallest r whose sparse U, V cost >= the dense layer
        assert (1 - s) * r * (d_in + d_out) >= d_in * d_out > (1 - s) * (r - 1) * (d_in + d_out)
        r = doped_rank(d_in, d_out, s)  # the largest r whose dense U, V fit in the FLOPs sparsity freed
        assert r * (d_in + d_out) <= s * d_in * d_out < (r + 1) * (d_in + d_out)


def test_transformed_layers_compute_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64)
    p = ParallelLinear(8, 5, bias=True, branches=3).double()
    expected = sum(x @ b.weight.t() + b.bias for b in p.branches)
    assert torch.allclose(p(x), expected, atol=1e-12)
    f = FactorizedLinear(8, 5, bias=True, rank=4).double()
    assert torch.allclose(f(x), (x @ f.u.weight.t()) @ f.v.weight.t() + f.v.bias, atol=1e-12)
    dp = DopedLinear(8, 5, bias=True, rank=2).double()
    expected = x @ dp.sparse.weight.t() + dp.sparse.bias + (x @ dp.lowrank_u.weight.t()) @ dp.lowrank_v.weight.t()
    assert torch.allclose(dp(x), expected, atol=1e-12)


def test_wide_widens_only_the_mlp_and_the_export_round_trips(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, sparse_ift="wide", sparse_ift_sparsity=0.75))
    assert tuple(model.h[0].mlp.c_fc.weight.shape) == (4 * 16 * 4, 16)
    assert tuple(model.h[0].attn.c_attn.weight.shape) == (3 * 16, 16)
    export_gpt_directory(model, tmp_path)
    loaded = load_gpt_directory(tmp_path)
    tokens = torch.randint(0, 256, (2, 8))
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_wide_job_config_trains_exactly_the_mlp_at_the_uniform_density():
    cfg = compose_pretrain_config(["sparse_ift=wide", "sparse_ift.sparsity=0.75", "sparsity=rigl"])
    assert (cfg.model.sparse_ift, cfg.model.sparse_ift_sparsity) == ("wide", 0.75)
    assert cfg.sparsity.density == 0.25 and cfg.sparsity.distribution == "uniform"
    shapes = validate_pretrain_config(cfg)
    assert shapes["h.0.mlp.c_fc.weight"] == [4 * D * 4, D]


@pytest.mark.parametrize("overrides, message", [
    (["sparse_ift=wide", "sparsity=nm"], "sparsity=rigl or sparsity=static"),
    (["sparse_ift=wide", "sparsity=rigl", "sparse_ift.sparsity=0"], r"expected a value in \(0, 1\)"),
    (["sparse_ift=wide", "sparsity=rigl", "sparse_ift.sparsity=1.5"], r"expected a value in \(0, 1\)"),
    (["sparse_ift=parallel", "sparsity=rigl", "sparse_ift.sparsity=0.6"], "not an integer"),
    (["sparse_ift=doped", "sparsity=static", "sparsity.exclude=[h.0.*]"], "remove sparsity.overrides"),
    (["sparse_ift=wide", "sparsity=rigl", "model=hf"], "needs model.from_scratch=true"),
])
def test_bad_sparse_ift_configs_are_named_errors(overrides, message):
    with pytest.raises(SparseIFTConfigError, match=message):
        compose_pretrain_config(overrides)


def test_unknown_kind_is_refused_at_load():
    from hydra.errors import ConfigCompositionException  # a missing group option

    with pytest.raises(ConfigCompositionException, match="sparse_ift/tall"):
        compose_pretrain_config(["sparse_ift=tall"])
