"""Bad HF model directories fail with ModelConfigError naming the thing, before any weight is
silently re-initialised."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import save_tiny_gpt2, save_tiny_llama
from models import ModelConfig, ModelConfigError, build_model


def _build(path, dtype="float32"):
    return build_model(ModelConfig(kind="hf", path=str(path), dtype=dtype))


def _copy(src, dst, edit_weights=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_weights:
        sd = load_file(str(dst / "model.safetensors"))
        edit_weights(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        _build(tmp_path / "nowhere")


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelConfigError, match="not a directory"):
        _build(tmp_path / "f")


def test_no_path_given():
    with pytest.raises(ModelConfigError, match="model.path is required"):
        build_model(ModelConfig(kind="hf"))


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        _build(tmp_path)


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="config.json could not be read"):
        _build(tmp_path)


def test_encoder_config_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelConfigError, match="bidirectional encoder"):
        _build(tmp_path)


def test_encoder_decoder_config_is_not_a_causal_lm(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(tmp_path)
    with pytest.raises(ModelConfigError, match="not a causal LM"):
        _build(tmp_path)


def test_no_weights_file(tmp_path, llama_dir):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="weights could not be loaded"):
        _build(d)


def test_missing_weight_is_an_error_not_a_random_init(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "m", edit_weights=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelConfigError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        _build(d)


def test_untied_lm_head_missing_is_an_error(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "m", edit_weights=lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(ModelConfigError, match=r"missing keys: lm_head\.weight"):
        _build(d)


def test_unexpected_weight_is_an_error(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "m",
              edit_weights=lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelConfigError, match=r"unexpected keys: model\.layers\.0\.extra\.weight"):
        _build(d)


def test_shape_mismatch_is_an_error(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "m", edit_config=lambda c: c.__setitem__("intermediate_size", 96))
    with pytest.raises(ModelConfigError, match=r"mismatched keys: .*mlp\.down_proj\.weight"):
        _build(d)


def test_tied_checkpoint_without_lm_head_is_fine(gpt2_dir):
    """GPT-2 checkpoints store the tied matrix once; that is not a missing key."""
    model, _ = _build(gpt2_dir)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bad_dtype(llama_dir):
    with pytest.raises(ModelConfigError, match="model.dtype='fp8'"):
        _build(llama_dir, dtype="fp8")


def test_dtype_is_applied(llama_dir):
    model, _ = _build(llama_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tokenizer_larger_than_model_vocab(tmp_path, gpt2_dir):
    d = tmp_path / "m"
    save_tiny_gpt2(d)  # tokenizer of 384 ids
    small = tmp_path / "small"
    save_tiny_gpt2(small, with_tokenizer=False)  # vocab 259
    shutil.copy(small / "model.safetensors", d / "model.safetensors")
    shutil.copy(small / "config.json", d / "config.json")
    with pytest.raises(ModelConfigError, match="its tokenizer has 384 ids but the model's vocab_size is 259"):
        _build(d)


def test_byte_tokenizer_needs_259_ids(tmp_path):
    d = save_tiny_llama(tmp_path / "m", with_tokenizer=False)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 200
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="byte tokenizer .* has 259 ids but the model's vocab_size is 200"):
        _build(d)


def test_broken_tokenizer_files_do_not_fall_back_to_bytes(tmp_path, llama_dir):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelConfigError, match="tokenizer files could not be loaded"):
        _build(d)


def test_skeleton_has_the_real_names_and_shapes_without_weights(llama_dir, gpt2_dir):
    from models.hf import load_hf_skeleton

    for path in (llama_dir, gpt2_dir):
        cfg = ModelConfig(kind="hf", path=str(path))
        skeleton, tok = load_hf_skeleton(cfg)
        real, real_tok = _build(path)
        assert all(p.device.type == "meta" for p in skeleton.parameters())
        assert [(n, p.shape) for n, p in skeleton.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
        assert tok.vocab_size == real_tok.vocab_size


def test_skeleton_catches_bad_input_without_weights(tmp_path, llama_dir):
    from models.hf import load_hf_skeleton

    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    (d / "model.safetensors").unlink()  # not needed for a skeleton
    load_hf_skeleton(ModelConfig(kind="hf", path=str(d)))
    with pytest.raises(ModelConfigError, match="does not exist"):
        load_hf_skeleton(ModelConfig(kind="hf", path=str(tmp_path / "nowhere")))
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(ModelConfigError, match="bidirectional encoder"):
        load_hf_skeleton(ModelConfig(kind="hf", path=str(bert)))


def test_build_model_under_meta_device_gives_the_skeleton(llama_dir):
    """Drivers build models under `torch.device("meta")` to check shapes before actors start."""
    with torch.device("meta"):
        model, tok = _build(llama_dir)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    real, _ = _build(llama_dir)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    with torch.device("meta"), pytest.raises(ModelConfigError, match="does not exist"):
        _build(llama_dir / "nowhere")
