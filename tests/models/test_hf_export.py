"""Export: masked weights out as a save_pretrained directory that transformers loads and
generates with, pruned entries exactly zero, sparsity.json beside it; and the built-in GPT's own
directory format."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import GPT, GPTConfig, ModelConfig, build_model
from models.export import ExportError, export_gpt_directory, export_hf_directory, load_gpt_directory
from models.hf_tokenizer import HFTokenizer

# Input axis of each target's weight, stated independently of models.sparsity_targets.
TARGETS = {
    "llama": ([f"model.layers.{i}.{p}.weight" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")], 1),
    "gpt2": ([f"transformer.h.{i}.{p}.weight" for i in range(2) for p in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")], 0),  # Conv1D: [in, out]
}


def mask_2_4(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive entries along `dim`."""
    moved = w.movedim(dim, -1)
    groups = moved.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter(-1, groups.abs().topk(2, -1).indices, True)
    return (groups * keep).reshape(moved.shape).movedim(-1, dim)


def _masked_state(model, names, dim):
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in names:
        state[n] = mask_2_4(state[n], dim)
    return state


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_directory_loads_generates_and_stays_2_4(arch, llama_dir, gpt2_dir, tmp_path):
    src = {"llama": llama_dir, "gpt2": gpt2_dir}[arch]
    names, dim = TARGETS[arch]
    model, _ = build_model(ModelConfig(kind="hf", path=str(src)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = _masked_state(model, names, dim)
    info = {n: {"pattern": "2:4", "dim": dim} for n in names}
    out = export_hf_directory(model, src, tmp_path / "out", state=state, sparsity_info=info)

    # the live model is untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    got = dict(loaded.named_parameters())
    assert set(got) == set(state)
    for n, t in state.items():
        assert torch.equal(got[n], t), n
    for n in names:
        w = got[n].detach().movedim(dim, -1).reshape(-1, 4)
        assert int((w != 0).sum(-1).max()) <= 2, n  # exactly 2:4 along the input axis
        assert int((w == 0).sum()) >= w.numel() // 2
    if arch == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    else:
        assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"])

    ids = torch.tensor([[5, 6, 7]])
    gen = loaded.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                          min_new_tokens=5, pad_token_id=2)
    assert gen.shape == (1, 8) and torch.equal(gen[:, :3], ids)

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.encode("the sparse model", add_special_tokens=False) == \
        AutoTokenizer.from_pretrained(str(src), local_files_only=True).encode("the sparse model", add_special_tokens=False)

    sp = json.loads((out / "sparsity.json").read_text())
    assert sp["format"] == "sparsetrain-sparsity/1"
    assert set(sp["tensors"]) == set(names)
    for n in names:
        assert sp["tensors"][n]["pattern"] == "2:4" and sp["tensors"][n]["dim"] == dim
        assert sp["tensors"][n]["nonzero_fraction"] <= 0.5

    # and back through our own loader, tokenizer included
    again, again_tok = build_model(ModelConfig(kind="hf", path=str(out)))
    assert isinstance(again_tok, HFTokenizer)
    assert torch.equal(dict(again.named_parameters())[names[0]], state[names[0]])


def test_bf16_export_records_its_dtype(llama_dir, tmp_path):
    model, _ = build_model(ModelConfig(kind="hf", path=str(llama_dir)))
    state = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    out = export_hf_directory(model, llama_dir, tmp_path / "bf16", state=state)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.config.dtype in ("float32", torch.float32)  # live config untouched
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not (out / "sparsity.json").exists()
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


def test_export_refuses_false_or_inconsistent_input(gpt2_dir, tmp_path):
    model, _ = build_model(ModelConfig(kind="hf", path=str(gpt2_dir)))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "transformer.h.0.mlp.c_fc.weight"
    with pytest.raises(ExportError, match=r"not 2:4 sparse along dim 0"):
        export_hf_directory(model, gpt2_dir, tmp_path / "a", state=state,
                            sparsity_info={name: {"pattern": "2:4", "dim": 0}})
    with pytest.raises(ExportError, match="missing parameter 'transformer.h.1.ln_2.bias'"):
        export_hf_directory(model, gpt2_dir, tmp_path / "b",
                            state={k: v for k, v in state.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(ExportError, match="the model does not"):
        export_hf_directory(model, gpt2_dir, tmp_path / "c", state={**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ExportError, match="has shape"):
        export_hf_directory(model, gpt2_dir, tmp_path / "d", state={**state, name: state[name].T})
    tied = {**state, "lm_head.weight": state["transformer.wte.weight"] + 1}
    with pytest.raises(ExportError, match="tied tensors"):
        export_hf_directory(model, gpt2_dir, tmp_path / "e", state=tied)


def test_builtin_gpt_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))
    names = [f"h.{i}.{p}.weight" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    state = _masked_state(model, names, dim=1)  # nn.Linear: [out, in]
    info = {n: {"pattern": "2:4", "dim": 1} for n in names}
    out = export_gpt_directory(model, tmp_path / "gpt", state=state, sparsity_info=info)
    loaded = load_gpt_directory(out)
    assert loaded.lm_head.weight is loaded.wte.weight  # tie survives, stored once
    for n, t in state.items():
        assert torch.equal(dict(loaded.named_parameters())[n], t), n
    ids = torch.tensor([[1, 2, 3, 4]])
    model.load_state_dict(state, strict=False)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert set(json.loads((out / "sparsity.json").read_text())["tensors"]) == set(names)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


def test_builtin_gpt_loader_refuses_mismatched_weights(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16))
    out = export_gpt_directory(model, tmp_path / "gpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["gpt_config"]["n_layer"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="weights do not match gpt_config"):
        load_gpt_directory(out)


@pytest.mark.parametrize("bias_and_tie", [True, False])
def test_builtin_gpt_exports_as_transformers_gpt2(bias_and_tie, tmp_path):
    from models.export import export_gpt_as_hf_directory
    from models.hf import follow_call_convention
    from models.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32, bias=bias_and_tie, tie_embeddings=bias_and_tie))
    names = [f"h.{i}.{p}.weight" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    state = _masked_state(model, names, dim=1)
    model.load_state_dict(state, strict=False)
    out = export_gpt_as_hf_directory(model, tmp_path / "gpt2", state=state,
                                     sparsity_info={n: {"pattern": "2:4", "dim": 1} for n in names})

    hf = follow_call_convention(AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True))
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == bias_and_tie
    # same function, also with left padding through the call convention
    ids = torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        got = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, 4:], ref[1, 4:], atol=1e-5, rtol=0)

    sp = json.loads((out / "sparsity.json").read_text())["tensors"]
    assert sp["transformer.h.0.attn.c_attn.weight"]["dim"] == 0  # Conv1D: input axis first
    for n in names:
        w = dict(hf.named_parameters())["transformer." + n]
        assert int((w != 0).reshape(-1, 4, w.shape[1]).sum(1).max()) <= 2  # 2:4 along dim 0

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "bytes \x00 ünï ✓ 🙂"
    assert tok.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_export_from_a_weightless_skeleton(llama_dir, tmp_path):
    """A run's masked state exported after the fact: only config, names and shapes come from
    the (meta-device) model; sparsity.json takes trainer/sparsity's own entries and metadata."""
    names, dim = TARGETS["llama"]
    real, _ = build_model(ModelConfig(kind="hf", path=str(llama_dir)))
    state = _masked_state(real, names, dim)
    with torch.device("meta"):
        skeleton, _ = build_model(ModelConfig(kind="hf", path=str(llama_dir)))
    with pytest.raises(ExportError, match="no data"):
        export_hf_directory(skeleton, llama_dir, tmp_path / "none")
    info = {n: {"kind": "nm", "n": 2, "m": 4, "input_dim": dim} for n in names}
    out = export_hf_directory(skeleton, llama_dir, tmp_path / "out", state=state, sparsity_info=info,
                              sparsity_meta={"method": "nm"})
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    got = dict(loaded.named_parameters())
    assert all(torch.equal(got[n], t) for n, t in state.items())
    sp = json.loads((out / "sparsity.json").read_text())
    assert sp["method"] == "nm" and sp["tensors"][names[0]]["pattern"] == "2:4" and sp["tensors"][names[0]]["dim"] == 1


def test_model_without_tokenizer_exports_the_byte_tokenizer(tmp_path):
    from hf_fixtures import save_tiny_gpt2

    from models.tokenizer import ByteTokenizer

    src = save_tiny_gpt2(tmp_path / "src", with_tokenizer=False)
    model, tok = build_model(ModelConfig(kind="hf", path=str(src)))
    assert isinstance(tok, ByteTokenizer)
    out = export_hf_directory(model, src, tmp_path / "out")
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf_tok.encode("hé!", add_special_tokens=False) == ByteTokenizer().encode("hé!")
    with pytest.raises(ExportError, match="not a directory"):
        export_hf_directory(model, tmp_path / "nowhere", tmp_path / "out2")
