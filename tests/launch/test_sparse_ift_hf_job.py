"""A pretraining job on a tiny Llama from scratch under sparse_ift=wide sparsity=rigl, in-process on
the shared Ray cluster: summary.json's cost counters against a hand count, the MLP's three
linears at density 1 - s in the export (an ordinary Llama of the widened intermediate_size),
attention dense."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_fixtures import save_tiny_llama

pytestmark = pytest.mark.ray

# hf_fixtures.save_tiny_llama's defaults: d 64, 2 layers, 4 query heads and 2 key/value heads of
# 16, intermediate 128, vocabulary 384; window 32
D, L, H, KV, HD, I, V, T = 64, 2, 4, 2, 16, 128, 384, 32
S = 0.75


def _pretrain_tiny_llama(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    """A few pretraining steps of a tiny Llama from scratch at sparse_ift.sparsity=S; (summary, run dir)."""
    from launch.config import compose_pretrain_config
    from launch.pretrain import run_pretrain

    source = save_tiny_llama(tmp_path / "llama")
    run_dir = tmp_path / "run"
    cfg = compose_pretrain_config([
        "model=hf", f"model.path={source}", "model.from_scratch=true", *overrides, f"sparse_ift.sparsity={S}",
        f"trainer.seq_len={T}", "trainer.eval_batches=1", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "data.max_bytes=60000", "optimizer.warmup_steps=1", "cluster.cpus_per_trainer=1",
        "logger=console", "logger.console=false",
    ])
    return run_pretrain(cfg, run_dir), run_dir


def test_wide_rigl_pretraining_on_a_llama_from_scratch(ray_cluster, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    summary, run_dir = _pretrain_tiny_llama(tmp_path, "sparse_ift=wide", "sparsity=rigl", "trainer.max_steps=4",
                                            "trainer.micro_batch_size=4", "optimizer.lr=3e-3")
    assert json.loads((run_dir / "summary.json").read_text())["model.flops_per_token"] == summary["model.flops_per_token"]
    assert summary["steps"] == 4 and summary["sparsity_method"] == "rigl" and summary["sparse_ift"] == "wide"
    # 2 FLOPs per multiply-add: per layer q, o d^2, k, v d (KV HD), the widened MLP 3 d (4 I) at
    # 1 - s, QK^T and AV H HD (T + 1) / 2 each; the head d V. = the dense Llama's count.
    per_layer = 2 * D * D + 2 * D * KV * HD + 3 * D * (4 * I) * (1 - S) + 2 * H * HD * (T + 1) / 2
    dense = 2 * (L * (2 * D * D + 2 * D * KV * HD + 3 * D * I + 2 * H * HD * (T + 1) / 2) + D * V)
    assert summary["model.flops_per_token"] == pytest.approx(2 * (L * per_layer + D * V), abs=1) == dense
    state = load_file(str(run_dir / "model.safetensors"))
    assert summary["model.params_total"] == sum(t.numel() for t in state.values())
    for i in range(L):
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = state[f"model.layers.{i}.mlp.{name}.weight"]
            assert w.numel() == D * 4 * I
            assert float((w != 0).float().mean()) == pytest.approx(1 - S, abs=1e-3), name
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert float((state[f"model.layers.{i}.self_attn.{name}.weight"] != 0).float().mean()) > 0.99
    claims = json.loads((run_dir / "sparsity.json").read_text())["tensors"]
    assert sorted(claims) == sorted(f"model.layers.{i}.mlp.{n}.weight" for i in range(L)
                                    for n in ("gate_proj", "up_proj", "down_proj"))
    model = AutoModelForCausalLM.from_pretrained(str(run_dir), local_files_only=True)
    assert model.config.intermediate_size == 4 * I
    assert torch.isfinite(model(torch.randint(0, V, (1, 8))).logits).all()


def test_doped_static_pretraining_exports_the_projects_layout(ray_cluster, tmp_path):
    """parallel/factorized/doped are no transformers architecture: the job's export is
    export_sparse_ift_hf_directory's layout, and loads back with the trained weights."""
    from safetensors.torch import load_file

    from models.export import load_sparse_ift_hf_directory

    summary, run_dir = _pretrain_tiny_llama(tmp_path, "sparse_ift=doped", "sparsity=static", "trainer.max_steps=2",
                                            "trainer.micro_batch_size=2")
    assert summary["sparse_ift"] == "doped" and summary["steps"] == 2
    assert json.loads((run_dir / "config.json").read_text())["model_type"] == "sparsetrain-sparse-ift-hf"
    state = load_file(str(run_dir / "model.safetensors"))
    sparse = [n for n in state if n.endswith(".sparse.weight")]
    assert len(sparse) == 7 * L
    for name in sparse:
        assert float((state[name] != 0).float().mean()) == pytest.approx(1 - S, abs=2e-3), name
    for name in (n for n in state if ".lowrank_" in n):
        assert float((state[name] != 0).float().mean()) > 0.99, name
    model = load_sparse_ift_hf_directory(run_dir)
    assert torch.equal(model.get_parameter(sparse[0]), state[sparse[0]])
    assert torch.isfinite(model(torch.randint(0, V, (1, 8))).logits).all()
