"""Bad sparsity configs fail at load time with a message naming the value or layer."""
from __future__ import annotations

import glob

import pytest
import torch
from omegaconf import OmegaConf
from sparsity_testlib import tiny_gpt

from models import GPT, GPTConfig
from trainer.sparsity import effective_estimator
from trainer.sparsity import (
    SparsityConfig, SparsityConfigError, build_sparsifier, module_shapes,
    validate_sparsity_config,
)


@pytest.fixture(scope="module")
def shapes():
    with torch.device("meta"):  # what the launcher does: shapes only, no memory
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    return module_shapes(model)


def test_meta_model_shapes(shapes):
    assert shapes["h.0.attn.c_attn"] == (192, 64) and shapes["h.1.mlp.c_proj"] == (64, 256)
    assert "lm_head" in shapes  # a candidate, but not in the default selection
    validate_sparsity_config(SparsityConfig(method="nm"), shapes)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "nm", "n": 4, "m": 4}, r"4:4"),
    ({"method": "nm", "n": 5, "m": 4}, r"5:4"),
    ({"method": "nm", "n": 0, "m": 4}, r"0:4"),
    ({"method": "nm", "n": 1, "m": 128}, r"h\.0\.attn\.c_attn.*M=128.*input dimension 64"),
    ({"method": "nm", "overrides": {"h.1.mlp.c_proj": {"n": 1, "m": 48}}}, r"h\.1\.mlp\.c_proj.*M=48.*256"),
    ({"method": "nm", "n": 1, "m": 8, "gradient_flow": "sdgf", "sdgf_schedule": "densify",
      "include": ["h.*"], "overrides": {"h.0.*": {"n": 1, "m": 32}}}, r"stage 1:256"),
    ({"method": "nm", "gradient_flow": "sdgf", "sdgf_schedule": "custom"}, r"sdgf_stages"),
    ({"method": "nm", "gradient_flow": "sdgf", "sdgf_schedule": "custom", "sdgf_stages": ["3"]}, r"'3'"),
    ({"method": "rigl", "density": 0.0}, r"density=0\.0"),
    ({"method": "set", "density": 1.5}, r"density=1\.5"),
    ({"method": "static", "overrides": {"h.0.*": {"density": -0.1}}}, r"density"),
    ({"method": "sparse_magic"}, r"method='sparse_magic'"),
    ({"method": "nm", "estimator": "sr-ste"}, r"estimator='sr-ste'"),
    ({"method": "nm", "gradient_flow": "mdgf"}, r"gradient_flow='mdgf'"),
    ({"method": "rigl", "distribution": "er"}, r"distribution='er'"),
    ({"method": "nm", "include": ["transformer.h.*"]}, r"include pattern 'transformer\.h\.\*' matches no"),
    ({"method": "nm", "exclude": ["*.q_proj"]}, r"exclude pattern '\*\.q_proj'"),
    ({"method": "nm", "overrides": {"h.9.*": {"n": 1, "m": 8}}}, r"overrides pattern 'h\.9\.\*'"),
    ({"method": "nm", "overrides": {"h.0.*": {"k": 1}}}, r"unknown keys \['k'\]"),
    ({"method": "nm", "include": ["h.0.*"], "exclude": ["h.0.*"]}, r"leaves no layer"),
    ({"method": "nm", "dense_fraction": 0.6, "fine_tune_fraction": 0.4}, r"no sparse phase"),
    ({"method": "magnitude", "density": 0.5, "initial_sparsity": 0.7}, r"initial_sparsity=0\.7"),
    ({"method": "rigl", "update_interval": 0}, r"update_interval=0"),
    ({"method": "rigl", "gradient_flow": "mdgf_exp"}, r"method=nm only"),
])
def test_bad_config_raises_naming_the_value(shapes, kwargs, match):
    with pytest.raises(SparsityConfigError, match=match):
        validate_sparsity_config(SparsityConfig(**kwargs), shapes)


def test_build_validates_too():
    with pytest.raises(SparsityConfigError, match="M=128"):
        build_sparsifier(tiny_gpt(), SparsityConfig(method="nm", n=2, m=128), 10)


def test_hydra_group_files_load_into_the_structured_config(shapes):
    files = sorted(glob.glob("conf/sparsity/*.yaml"))
    names = {f.rsplit("/", 1)[1][:-5] for f in files}
    assert names == {"dense", "nm", "rigl", "set", "static", "magnitude", "scl"}
    for f in files:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparsityConfig), OmegaConf.load(f)))
        assert cfg.method == f.rsplit("/", 1)[1][:-5]
        validate_sparsity_config(cfg, shapes)
    nm = OmegaConf.merge(OmegaConf.structured(SparsityConfig), OmegaConf.load("conf/sparsity/nm.yaml"),
                         OmegaConf.from_dotlist(["n=1", "m=8", "estimator=ste"]))
    assert (nm.n, nm.m, nm.estimator) == (1, 8, "ste")
    plain = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparsityConfig), OmegaConf.load("conf/sparsity/nm.yaml")))
    assert effective_estimator(plain) == "sr_ste"  # SR-STE by default without gradient flow...
    plain.gradient_flow = "sdgf"
    assert effective_estimator(plain) == "ste"  # ...plain STE on the progressive-flow paths (reference code)
    assert plain.sr_ste_form == "decoupled"
    assert plain.sr_ste_decay == SparsityConfig().sr_ste_decay == 1.0  # lambda_d per unit of lr (SR_STE_DECAY)
