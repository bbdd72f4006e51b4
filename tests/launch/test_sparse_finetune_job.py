"""Issue 12 through the pretraining job (in-process on the shared Ray cluster): a pretrained HF
model keeps its largest weights under RigL init=magnitude, `sparsity=nm distill=squarehead`
exports an exactly 2:4 HF directory, SDGF 3:8 exports exactly 3:8, and bad input is refused
before any actor starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_fixtures import save_tiny_llama

from launch.config import compose_pretrain_config, validate_pretrain_config
from trainer.distill import DistillConfigError
from trainer.sparsity import SparsityConfigError

pytestmark = pytest.mark.ray

QUIET = ["logger=console", "logger.console=false"]
SHORT = ["trainer.seq_len=32", "trainer.micro_batch_size=4", "trainer.eval_batches=1", "trainer.eval_every=0",
         "trainer.checkpoint_every=0", "data.max_bytes=60000", "cluster.cpus_per_trainer=1", *QUIET]
LLAMA_PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "llama")


def projection_names(n_layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{p}.weight" for i in range(n_layers) for p in LLAMA_PROJECTIONS]


def test_rigl_magnitude_init_keeps_a_pretrained_models_largest_weights(llama, ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from launch.pretrain import run_pretrain

    cfg = compose_pretrain_config([
        "model=hf", f"model.path={llama}", "sparsity=rigl", "sparsity.density=0.5", "sparsity.distribution=uniform",
        "sparsity.init=magnitude", "trainer.max_steps=3", "optimizer.lr=1e-6", "optimizer.min_lr=1e-7",
        "optimizer.warmup_steps=0", *SHORT,
    ])
    run_pretrain(cfg, tmp_path)
    before = load_file(str(llama / "model.safetensors"))
    after = load_file(str(tmp_path / "model.safetensors"))
    for name in projection_names():
        w = before[name].float()
        k = w.numel() // 2
        largest = torch.zeros(w.numel(), dtype=torch.bool)
        largest[torch.argsort(w.abs().flatten(), descending=True)[:k]] = True
        kept = (after[name] != 0).flatten()
        assert float((kept & largest).sum()) / k >= 0.95, name


def test_nm_squarehead_from_a_pretrained_model_exports_exact_2_4(llama, ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    from launch.pretrain import run_pretrain

    cfg = compose_pretrain_config([
        "model=hf", f"model.path={llama}", "sparsity=nm", "distill=squarehead", "distill.teacher_dtype=float32",
        "trainer.max_steps=3", "optimizer.lr=1e-4", "optimizer.min_lr=1e-5", "optimizer.warmup_steps=1", "trainer.log_every=1",
        *SHORT,
    ])
    summary = run_pretrain(cfg, tmp_path)
    assert summary["distill"] == "squarehead" and 0 <= summary["sparsity/pruned_to_kept_norm"] < 1.5
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    params = dict(model.named_parameters())
    doc = json.loads((tmp_path / "sparsity.json").read_text())
    assert doc["estimator"] == "sr_ste" and doc["sr_ste_form"] == "decoupled" and doc["stage"] == "2:4"
    for name in projection_names():
        groups = (params[name] != 0).reshape(-1, 4).sum(-1)  # nn.Linear [out, in]: groups along in
        assert int(groups.max()) <= 2 and (groups == 2).float().mean() > 0.99, name
        assert doc["tensors"][name]["pattern"] == "2:4"


def test_sdgf_3_8_exports_exactly_3_8(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from launch.pretrain import run_pretrain

    cfg = compose_pretrain_config([
        "model=gpt_tiny", "sparsity=nm", "sparsity.n=3", "sparsity.m=8", "sparsity.gradient_flow=sdgf",
        "trainer.max_steps=6", "optimizer.warmup_steps=1", *SHORT,
    ])
    summary = run_pretrain(cfg, tmp_path)
    assert summary["sparsity/n"] == 3 and summary["sparsity/m"] == 8 and summary["sparsity/sr_ste"] == 0.0
    state = load_file(str(tmp_path / "model.safetensors"))
    doc = json.loads((tmp_path / "sparsity.json").read_text())
    assert doc["estimator"] == "ste" and doc["stage"] == "3:8"
    for name, claim in doc["tensors"].items():
        assert claim["pattern"] == "3:8"
        groups = (state[name] != 0).reshape(-1, 8).sum(-1)
        assert int(groups.max()) <= 3 and (groups == 3).float().mean() > 0.99, name


@pytest.mark.parametrize("overrides,error,match", [
    (["sparsity=rigl", "sparsity.init=magnitude"], SparsityConfigError, "init=magnitude"),
    (["sparsity=nm", "sparsity.sr_ste_decay=5000"], SparsityConfigError, "sr_ste_decay"),
    (["sparsity=nm", "sparsity.sr_ste_lambda=2"], SparsityConfigError, "sr_ste_lambda"),
    (["sparsity=nm", "sparsity.gradient_flow=mdgf_linear", "sparsity.decay_coef=3"], SparsityConfigError, "decay_coef"),
    (["distill=squarehead"], DistillConfigError, "distill=squarehead"),
])
def test_bad_input_refused_at_config_time(overrides, error, match):
    cfg = compose_pretrain_config(["model=gpt_tiny", "trainer.seq_len=32", *QUIET, *overrides])
    with pytest.raises(error, match=match):
        validate_pretrain_config(cfg)
