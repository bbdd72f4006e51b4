"""launch/config.py: the composed config is typed and checked before anything starts."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from launch.cluster import ClusterResourceError
from launch.config import PretrainConfig, compose_pretrain_config, validate_pretrain_config
from models import ModelConfigError
from trainer.config import TrainerConfigError
from trainer.sparsity import SparsityConfigError


def test_default_config_composes_and_validates():
    cfg = compose_pretrain_config([])
    assert isinstance(cfg, PretrainConfig)
    assert cfg.cluster.trainers == 2 and cfg.sparsity.method == "dense" and cfg.data.source == "stdlib"
    shapes = validate_pretrain_config(cfg)
    assert shapes["h.0.attn.c_attn.weight"] == [3 * cfg.model.n_embd, cfg.model.n_embd]


def test_group_options_and_overrides_apply():
    cfg = compose_pretrain_config(["sparsity=nm", "model=gpt_tiny", "trainer.max_steps=7", "cluster.trainers=1",
                                   "resume=auto", "logger=console"])
    assert (cfg.sparsity.method, cfg.sparsity.n, cfg.sparsity.m) == ("nm", 2, 4)
    assert cfg.model.n_embd == 64 and cfg.trainer.max_steps == 7 and cfg.resume == "auto"
    assert cfg.logger.wandb is False


@pytest.mark.parametrize("overrides, error, message", [
    (["trainer.no_such_key=1"], ConfigCompositionException, "no_such_key"),
    (["sparsity=no_such_method"], ConfigCompositionException, "no_such_method"),
    (["trainer.max_steps=many"], ConfigCompositionException, "max_steps"),
])
def test_unknown_keys_options_and_types_are_rejected_at_load(overrides, error, message):
    with pytest.raises(error) as info:
        compose_pretrain_config(overrides)
    text = str(info.value) + str(info.value.__cause__)
    assert message in text


@pytest.mark.parametrize("overrides, error, message", [
    (["trainer.precision=fp16"], TrainerConfigError, "trainer.precision='fp16'"),
    (["trainer.seq_len=512"], TrainerConfigError, "exceeds the model's context of 256"),
    (["sparsity=nm", "sparsity.m=3"], SparsityConfigError, "M=3"),
    (["sparsity=rigl", "sparsity.backward=transposable"], SparsityConfigError, "sparsity.backward='transposable' applies to method=nm only"),
    (["sparsity=scl", "sparsity.end_fraction=0.95"], SparsityConfigError, "SCL density target cannot be reached"),
    (["cluster.trainers=0"], ClusterResourceError, "cluster.trainers=0"),
    (["model.kind=llama"], ModelConfigError, "model.kind='llama'"),
    (["trainer.device=cuda"], TrainerConfigError, "cluster.gpus_per_trainer=1"),
])
def test_bad_values_fail_validation_with_the_key_named(overrides, error, message):
    cfg = compose_pretrain_config(overrides)
    with pytest.raises(error, match=message):
        validate_pretrain_config(cfg)


def test_cli_rejects_an_unknown_key_before_starting_anything(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.pretrain", "trainer.bogus=1", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "bogus" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_distillation_from_scratch_needs_a_teacher_path(tmp_path):
    """A model built from scratch has no pretrained starting model to distil from."""
    from models import ModelConfig
    from trainer.distill import DistillConfig, DistillConfigError, validate_distill_config

    with pytest.raises(DistillConfigError, match="model.from_scratch=true has no pretrained starting model"):
        validate_distill_config(DistillConfig(name="kl"), ModelConfig(kind="hf", path=str(tmp_path), from_scratch=True))
