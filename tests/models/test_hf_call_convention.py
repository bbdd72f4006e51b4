"""An HF causal LM loaded by models.hf answers the built-in GPT's call convention: left-padded,
KV-cached incremental decoding reproduces the unpadded full forward, and a greedy loop on it
reproduces transformers' own generate()."""
from __future__ import annotations

import torch

from models import ModelConfig, build_model

TOL = 1e-4


def _load(path):
    model, tok = build_model(ModelConfig(kind="hf", path=str(path), dtype="float32"))
    return model, tok


def _left_pad(seqs, pad_id):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def test_architectures_are_the_ones_claimed(llama_dir, gpt2_dir):
    llama, _ = _load(llama_dir)
    c = llama.config
    assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention
    head_dim = c.hidden_size // c.num_attention_heads
    k = llama.model.layers[0].self_attn.k_proj.weight
    assert tuple(k.shape) == (c.num_key_value_heads * head_dim, c.hidden_size)
    assert llama.lm_head.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()

    gpt2, _ = _load(gpt2_dir)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied
    names = [n for n, _ in gpt2.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert "lm_head.weight" in gpt2.state_dict()
    # Conv1D: weight is [in, out]
    assert tuple(gpt2.transformer.h[0].mlp.c_fc.weight.shape) == (c_in := gpt2.config.n_embd, 4 * c_in)


@torch.no_grad()
def test_left_padding_with_kv_cache_matches_unpadded_forward(hf_dir):
    model, tok = _load(hf_dir)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 3, 5)]
    steps = torch.randint(3, V, (3, 4), generator=g)  # tokens fed one at a time after the prompt

    # Reference: each sequence alone, no padding, no cache, one full forward.
    refs = [model(torch.tensor([p + steps[i].tolist()])).logits[0] for i, p in enumerate(prompts)]

    ids, mask = _left_pad(prompts, tok.pad_id)
    out = model(ids, attention_mask=mask, use_cache=True)
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        real = out.logits[i, width - len(p):]
        torch.testing.assert_close(real, refs[i][: len(p)], atol=TOL, rtol=0)
    past = out.past_key_values
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        out = model(steps[:, t: t + 1], attention_mask=mask, past_key_values=past, use_cache=True)
        past = out.past_key_values
        for i, p in enumerate(prompts):
            torch.testing.assert_close(out.logits[i, -1], refs[i][len(p) + t], atol=TOL, rtol=0)


@torch.no_grad()
def test_explicit_position_ids_are_respected(gpt2_dir):
    """GPT-2 has absolute positions: shifting position_ids must change the logits, so the hook
    only fills them in when the caller gave none."""
    model, _ = _load(gpt2_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    base = model(ids).logits
    same = model(ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(4)[None]).logits
    shifted = model(ids, position_ids=torch.arange(10, 14)[None]).logits
    torch.testing.assert_close(same, base, atol=TOL, rtol=0)
    assert (shifted - base).abs().max() > 1e-3


def test_positional_arguments_after_input_ids_are_refused(gpt2_dir):
    model, _ = _load(gpt2_dir)
    ids = torch.tensor([[5, 6]])
    try:
        model(ids, torch.ones_like(ids))
    except TypeError as e:
        assert "keyword" in str(e)
    else:
        raise AssertionError("a positional attention_mask must be refused (GPT-2's 2nd arg is past_key_values)")


@torch.no_grad()
def test_greedy_loop_with_kv_cache_matches_generate(hf_dir):
    model, tok = _load(hf_dir)
    # Sharpen the random model's output so greedy choices are not float-noise ties (scale the
    # final norm: scaling GPT-2's tied lm_head would also scale its input embeddings).
    final_norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    final_norm.weight.mul_(30.0)
    if hasattr(model, "transformer"):  # make GPT-2's absolute positions matter to the argmax
        model.transformer.wpe.weight.mul_(10.0)
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (6, 2, 4)]
    ids, mask = _left_pad(prompts, tok.pad_id)
    n_new = 8

    out = model(ids, attention_mask=mask, use_cache=True)
    mine = []
    for _ in range(n_new):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mine.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model(nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    mine = torch.cat(mine, 1)

    ids, mask = _left_pad(prompts, tok.pad_id)
    ref = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
        pad_token_id=tok.pad_id, eos_token_id=None,
    )[:, ids.shape[1]:]
    assert torch.equal(mine, ref), (mine, ref)
    assert len(set(mine.flatten().tolist())) > 1  # not a degenerate constant output


def test_model_dropout_overrides_checkpoint_dropout(gpt2_dir):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model, _ = build_model(ModelConfig(kind="hf", path=str(gpt2_dir), dropout=0.0))
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0
    model.train()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)
    noisy, _ = build_model(ModelConfig(kind="hf", path=str(gpt2_dir), dropout=0.5))
    noisy.train()
    assert (noisy(ids).logits - noisy(ids).logits).abs().max() > 1e-3


@torch.no_grad()
def test_cast_parameters_matches_transformers_bf16_loading(llama_dir, gpt2_dir):
    from models.hf import cast_parameters

    for path in (llama_dir, gpt2_dir):
        model, _ = build_model(ModelConfig(kind="hf", path=str(path)))
        cast_parameters(model, torch.bfloat16)
        ref, _ = build_model(ModelConfig(kind="hf", path=str(path), dtype="bfloat16"))  # transformers' own cast
        for (n, a), (m, b) in zip(model.named_buffers(), ref.named_buffers()):
            assert n == m and a.dtype == b.dtype and torch.equal(a, b), n  # RoPE inv_freq stays fp32
        for (n, a), (m, b) in zip(model.named_parameters(), ref.named_parameters()):
            assert n == m and a.dtype == torch.bfloat16 and torch.equal(a, b), n
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives the cast
