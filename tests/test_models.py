"""The built-in GPT: cached decoding and left padding give the same logits as a plain forward."""
import torch

from models import GPT, GPTConfig


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=32)).eval()


def test_kv_cache_matches_full_forward():
    m = _model()
    x = torch.randint(0, 256, (2, 10))
    full = m(x).logits
    first = m(x[:, :6], use_cache=True)
    rest = m(x[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=0)


def test_left_padding_matches_unpadded_sequence():
    m = _model()
    x = torch.randint(0, 256, (1, 8))
    padded = torch.cat([torch.full((1, 3), 258), x], 1)
    mask = torch.tensor([[0, 0, 0] + [1] * 8])
    out = m(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(out, m(x).logits, atol=1e-5, rtol=0)
    # The same through the KV cache, one token at a time after the prompt.
    cache = m(padded[:, :6], attention_mask=mask[:, :6], use_cache=True)
    step = m(padded[:, 6:], attention_mask=mask, past_key_values=cache.past_key_values)
    torch.testing.assert_close(step.logits, m(x).logits[:, 3:], atol=1e-5, rtol=0)


def test_positions_beyond_block_size_are_rejected():
    m = _model()
    try:
        m(torch.zeros(1, 33, dtype=torch.long))
    except ValueError as e:
        assert "block_size" in str(e)
    else:
        raise AssertionError("expected ValueError")
