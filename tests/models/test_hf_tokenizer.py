"""The tokenizer that comes with an HF model directory, behind the Tokenizer interface."""
from __future__ import annotations

import json

import pytest

from hf_fixtures import save_tiny_gpt2, save_tiny_llama
from models import ByteTokenizer, ModelConfig, build_model
from models.hf_tokenizer import HFTokenizer, prompt_ids


def _tok(path):
    return build_model(ModelConfig(kind="hf", path=str(path)))[1]


def test_own_tokenizer_ids_and_round_trip(llama_dir):
    tok = _tok(llama_dir)
    assert isinstance(tok, HFTokenizer)
    vocab = json.loads((llama_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.vocab_size == 384
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # trained with <s>, </s>, <pad> first
    text = "the sparse model trains: 12 + 30 = 42 ünïcode"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # no specials added
    assert len(ids) < len(text.encode())  # BPE merges happened
    assert tok.decode(ids) == text
    # specials and out-of-tokenizer ids (a padded embedding table) are dropped on decode
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, 10_000]) == text
    # a merge from the trained vocabulary maps to its id
    assert tok.encode(" publishes") == [vocab["Ġpublishes"]]  # Ġ is byte-level BPE's space


def test_chat_template_applied_to_prompts(llama_dir):
    tok = _tok(llama_dir)
    assert tok.has_chat_template
    text = tok.apply_chat_template("2 + 2 =")
    assert text == "<|im_start|>user\n2 + 2 =<|im_end|>\n<|im_start|>assistant\n"
    ids = prompt_ids(tok, "2 + 2 =")
    im_start = tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 2  # special text -> special id
    assert tok.decode(ids) == "user\n2 + 2 =\nassistant\n"


def test_without_chat_template_prompts_are_unchanged(gpt2_dir):
    tok = _tok(gpt2_dir)
    assert not tok.has_chat_template
    assert tok.apply_chat_template("2 + 2 =") == "2 + 2 ="
    assert prompt_ids(tok, "2 + 2 =") == [tok.bos_id] + tok.encode("2 + 2 =")


def test_no_tokenizer_files_means_byte_tokenizer(tmp_path):
    d = save_tiny_gpt2(tmp_path / "g", with_tokenizer=False)
    tok = _tok(d)
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert prompt_ids(tok, "a") == [256, 97]


def test_missing_bos_and_pad_fall_back_to_eos(tmp_path):
    """GPT-2/Qwen-style tokenizers without BOS or PAD: both become EOS (documented)."""
    d = save_tiny_llama(tmp_path / "m")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("bos_token"), cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    tok = _tok(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 1, 1)


def test_tokenizer_without_eos_is_refused(tmp_path):
    from models import ModelConfigError

    d = save_tiny_llama(tmp_path / "m")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("eos_token")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="no eos_token"):
        _tok(d)


def test_byte_tokenizer_written_as_hf_files_encodes_like_byte_tokenizer(tmp_path):
    import random

    from transformers import AutoTokenizer

    from models.hf_tokenizer import save_byte_tokenizer_as_hf

    save_byte_tokenizer_as_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    tok, ref = HFTokenizer(hf), ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    rng = random.Random(0)
    texts = ["", "a", "hello  world\n\t", "\x00\x01 ünïcödé ✓ 日本語 🙂",
             "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(500))]
    for text in texts:
        assert tok.encode(text) == ref.encode(text) == list(text.encode("utf-8"))
        assert tok.decode(ref.encode(text)) == text
    assert tok.decode([256, 104, 105, 257, 258]) == "hi"
