"""Sparse-IFT on Hugging Face Llama-family models trained from scratch (models/sparse_ift.py,
models/hf.py with model.from_scratch): the transformed tiny Llama's parameter names and shapes,
its forward, iso-FLOP against a hand count (grouped-query attention, SwiGLU MLP, untied head),
which parameters the sparsity patterns select, exports, and the refusals."""
from __future__ import annotations

import fnmatch
import json

import pytest
import torch
import torch.nn as nn

from launch.config import compose_pretrain_config, validate_pretrain_config
from models import ModelConfig, build_model
from models.export import (
    ExportError, export_hf_directory, export_sparse_ift_hf_directory, load_sparse_ift_hf_directory,
)
from models.flops import flops_per_token, params_total
from models.sparse_ift import SparseIFTConfigError, doped_rank, factorized_rank, sparse_module_patterns

# hf_fixtures.save_tiny_llama's defaults: d 64, 2 layers, 4 query heads and 2 key/value heads of
# 16, intermediate 128, vocabulary 384, untied head
D, L, H, KV, HD, I, V, T = 64, 2, 4, 2, 16, 128, 384, 32
# (d_in, d_out) of the seven decoder-layer linears, written out here
SHAPES = {"self_attn.q_proj": (D, H * HD), "self_attn.k_proj": (D, KV * HD), "self_attn.v_proj": (D, KV * HD),
          "self_attn.o_proj": (H * HD, D), "mlp.gate_proj": (D, I), "mlp.up_proj": (D, I), "mlp.down_proj": (I, D)}
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def dense_flops_by_hand(inner: int = I, mlp_density: float = 1.0) -> float:
    """2 FLOPs per multiply-add: per layer q and o d^2 each, k and v d (KV HD) each, the MLP's
    three linears d * inner each; QK^T and AV H HD (T + 1) / 2 each (every query head, shared
    keys or not); the head d V."""
    attn = 2 * D * D + 2 * D * KV * HD
    mlp = 3 * D * inner * mlp_density
    scores = 2 * H * HD * (T + 1) / 2
    return 2 * (L * (attn + mlp + scores) + D * V)


def _config(path, kind: str = "none", s: float = 0.0, **kw) -> ModelConfig:
    return ModelConfig(kind="hf", path=str(path), from_scratch=True, sparse_ift=kind, sparse_ift_sparsity=s, **kw)


def _meta(path, kind: str = "none", s: float = 0.0) -> nn.Module:
    with torch.device("meta"):
        return build_model(_config(path, kind, s))[0]


def _selected(model: nn.Module, kind: str) -> list[str]:
    patterns = sparse_module_patterns(kind, "hf")
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns))


def _densities(model: nn.Module, kind: str, s: float) -> dict[str, float]:
    return {f"{name}.weight": 1.0 - s for name in _selected(model, kind)}


def test_dense_from_scratch_counts_match_the_hand_formulas(llama_dir):
    model = _meta(llama_dir)
    assert flops_per_token(model, T) == pytest.approx(dense_flops_by_hand(), abs=1)
    # embeddings, per layer two RMSNorms and the seven linears (no biases), the final norm, the head
    per_layer = 2 * D + sum(a * b for a, b in SHAPES.values())
    assert params_total(model) == V * D + L * per_layer + D + D * V


def test_from_scratch_is_fresh_weights_and_seeded(llama_dir):
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(llama_dir), local_files_only=True)
    torch.manual_seed(1)
    a = build_model(_config(llama_dir))[0]
    torch.manual_seed(1)
    b = build_model(_config(llama_dir))[0]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.get_parameter(name), b.get_parameter(name))
    assert not torch.equal(a.get_parameter(name), saved.get_parameter(name))


@pytest.mark.parametrize("kind, s", [("wide", 0.5), ("wide", 0.75), ("wide", 0.9), ("parallel", 0.5),
                                     ("parallel", 0.75), ("factorized", 0.75), ("doped", 0.5), ("doped", 0.75)])
def test_every_kind_is_iso_flop_and_adds_parameters(llama_dir, kind, s):
    model = _meta(llama_dir, kind, s)
    flops = flops_per_token(model, T, _densities(model, kind, s))
    if kind in ("wide", "parallel"):
        # I k (128 x 2, 4, 10) and 1/(1-s) are integers here: exactly iso-FLOP
        assert flops == pytest.approx(dense_flops_by_hand(), abs=1)
    else:  # ranks are integers: a few units in tens of columns
        assert flops == pytest.approx(dense_flops_by_hand(), rel=0.01)
    assert params_total(model) > params_total(_meta(llama_dir))


def test_wide_rounding_bounds_the_flop_difference(tmp_path):
    """intermediate 100 at s = 0.7: I k = 333.3 rounds to 333, so each of the MLP's three linears
    is off by at most half a column at density 0.3: |delta| <= 2 L 3 d 0.3 / 2 FLOPs per token."""
    from hf_fixtures import save_tiny_llama

    path = save_tiny_llama(tmp_path / "llama100", intermediate_size=100)
    model = _meta(path, "wide", 0.7)
    assert model.config.intermediate_size == 333
    flops = flops_per_token(model, T, _densities(model, "wide", 0.7))
    assert flops == pytest.approx(dense_flops_by_hand(inner=333, mlp_density=0.3), abs=1)
    assert abs(flops - dense_flops_by_hand(inner=100)) <= 2 * L * 3 * D * 0.3 / 2 + 1


def test_names_and_shapes_of_each_transformed_llama(llama_dir):
    s = 0.75
    wide = dict(_meta(llama_dir, "wide", s).named_parameters())
    assert tuple(wide["model.layers.0.mlp.gate_proj.weight"].shape) == (4 * I, D)
    assert tuple(wide["model.layers.0.mlp.down_proj.weight"].shape) == (D, 4 * I)
    assert tuple(wide["model.layers.0.self_attn.q_proj.weight"].shape) == (H * HD, D)
    for kind in ("parallel", "factorized", "doped"):
        params = {n: tuple(p.shape) for n, p in _meta(llama_dir, kind, s).named_parameters()}
        expected = {}
        for linear, (d_in, d_out) in SHAPES.items():
            prefix = f"model.layers.1.{linear}"
            if kind == "parallel":
                expected.update({f"{prefix}.branches.{b}.weight": (d_out, d_in) for b in range(4)})
            elif kind == "factorized":
                r = factorized_rank(d_in, d_out, s)
                expected.update({f"{prefix}.u.weight": (r, d_in), f"{prefix}.v.weight": (d_out, r)})
            else:
                r = doped_rank(d_in, d_out, s)
                expected.update({f"{prefix}.sparse.weight": (d_out, d_in), f"{prefix}.lowrank_u.weight": (r, d_in),
                                 f"{prefix}.lowrank_v.weight": (d_out, r)})
        layer1 = {n: v for n, v in params.items() if n.startswith("model.layers.1.") and "norm" not in n}
        assert layer1 == expected, kind
        # outside the decoder layers nothing changed
        assert params["lm_head.weight"] == (V, D) and params["model.embed_tokens.weight"] == (V, D)


def test_the_patterns_select_exactly_the_sparse_parts(llama_dir):
    layers = [f"model.layers.{i}" for i in range(L)]
    expected = {
        "wide": [f"{layer}.{m}" for layer in layers for m in MLP],
        "parallel": [f"{layer}.{lin}.branches.{b}" for layer in layers for lin in SHAPES for b in range(4)],
        "factorized": [f"{layer}.{lin}.{part}" for layer in layers for lin in SHAPES for part in ("u", "v")],
        "doped": [f"{layer}.{lin}.sparse" for layer in layers for lin in SHAPES],  # low-rank parts dense
    }
    for kind, names in expected.items():
        assert _selected(_meta(llama_dir, kind, 0.75), kind) == sorted(names), kind


@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized", "doped"])
def test_transformed_llama_runs_forward_and_backward(llama_dir, kind):
    torch.manual_seed(0)
    model, _ = build_model(_config(llama_dir, kind, 0.75))
    tokens = torch.randint(0, V, (2, 8))
    logits = model(tokens, attention_mask=torch.ones(2, 8, dtype=torch.long)).logits
    assert logits.shape == (2, 8, V) and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("model.layers."))


def test_transformed_init_keeps_the_dense_scale(llama_dir):
    """factorized V U and every new linear start at the Llama init's std (initializer_range 0.02)."""
    torch.manual_seed(0)
    model, _ = build_model(_config(llama_dir, "factorized", 0.75))
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert float((down.v.weight @ down.u.weight).detach().std()) == pytest.approx(0.02, rel=0.15)
    torch.manual_seed(0)
    doped, _ = build_model(_config(llama_dir, "doped", 0.75))
    assert float(doped.get_submodule("model.layers.0.mlp.up_proj.sparse").weight.detach().std()) == pytest.approx(0.02, rel=0.1)


def test_wide_exports_as_a_plain_llama(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, _ = build_model(_config(llama_dir, "wide", 0.75))
    export_hf_directory(model, llama_dir, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == 4 * I
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    tokens = torch.randint(0, V, (2, 8))
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("kind", ["parallel", "factorized", "doped"])
def test_transformed_exports_in_the_projects_layout_and_round_trips(llama_dir, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, _ = build_model(_config(llama_dir, kind, 0.75))
    export_sparse_ift_hf_directory(model, kind, 0.75, llama_dir, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "sparsetrain-sparse-ift-hf"
    assert config["sparse_ift"] == {"kind": kind, "sparsity": 0.75}
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_sparse_ift_hf_directory(tmp_path)
    tokens = torch.randint(0, V, (2, 8))
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    with pytest.raises(Exception, match="sparsetrain-sparse-ift-hf"):  # never silently a random Llama
        AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    with pytest.raises(ExportError, match="none and wide export with export_hf_directory"):
        export_sparse_ift_hf_directory(model, "wide", 0.75, llama_dir, tmp_path / "w")


def test_qwen2_and_mistral_are_llama_family(qwen2_dir, tmp_path):
    from transformers import MistralConfig

    names = [n for n, _ in _meta(qwen2_dir, "doped", 0.5).named_parameters()]
    assert "model.layers.0.self_attn.q_proj.sparse.bias" in names  # Qwen2's q/k/v biases kept, on the sparse W
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    MistralConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64).save_pretrained(str(mistral))
    names = [n for n, _ in _meta(mistral, "factorized", 0.75).named_parameters()]
    assert "model.layers.0.mlp.down_proj.v.weight" in names


def test_pretrained_weights_and_other_families_are_refused(llama_dir, gpt2_dir):
    with pytest.raises(SparseIFTConfigError, match="needs model.from_scratch=true"):
        compose_pretrain_config(["sparse_ift=wide", "sparsity=rigl", "model=hf", f"model.path={llama_dir}"])
    with pytest.raises(SparseIFTConfigError, match="needs model.from_scratch=true"):
        build_model(ModelConfig(kind="hf", path=str(llama_dir), sparse_ift="doped", sparse_ift_sparsity=0.5))
    cfg = compose_pretrain_config(["sparse_ift=parallel", "sparsity=rigl", "model=hf", f"model.path={gpt2_dir}",
                                   "model.from_scratch=true"])
    with pytest.raises(SparseIFTConfigError, match="model_type='gpt2'"):
        validate_pretrain_config(cfg)


def test_wide_job_config_trains_exactly_the_mlp_from_random_init(llama_dir):
    from trainer.sparsity import effective_init

    cfg = compose_pretrain_config(["sparse_ift=wide", "sparse_ift.sparsity=0.75", "sparsity=rigl", "model=hf",
                                   f"model.path={llama_dir}", "model.from_scratch=true", "trainer.seq_len=32"])
    assert cfg.sparsity.include == [f"model.layers.*.{m}" for m in MLP]
    assert cfg.sparsity.density == 0.25 and cfg.sparsity.distribution == "uniform"
    assert effective_init(cfg.sparsity, cfg.model.pretrained) == "random"
    shapes = validate_pretrain_config(cfg)
    assert shapes["model.layers.0.mlp.up_proj.weight"] == [4 * I, D]
