"""Batched KV-cache sampling: logprobs, stop tokens, padding, top-p."""
import torch

from models import GPT, GPTConfig
from rollout.batch import completion_columns, sequence_layout
from rollout.generation import SamplingConfig, generate, left_pad, top_p_filter
from trainer.algos.logprobs import token_logprobs

PAD, EOS = 258, 257


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=64)).eval()


def _prompts():
    return [[256, 49, 50, 43], [256, 55, 43, 56, 57, 61], [256, 97]]


def test_logprobs_match_a_plain_forward_without_cache():
    """Recompute every sampled token's logprob by a no-cache forward over each row alone
    (no padding at all), with the temperature applied, and compare."""
    m = _model()
    T = 0.7
    g = generate(m, _prompts(), SamplingConfig(temperature=T, max_new_tokens=6), stop_ids=[EOS], pad_id=PAD,
                 generator=torch.Generator().manual_seed(1))
    for i, p in enumerate(_prompts()):
        n = int(g.lengths[i])
        seq = torch.tensor([p + g.tokens[i, :n].tolist()])
        logits = m(seq).logits[0].float() / T
        expected = logits.log_softmax(-1)[len(p) - 1:len(p) - 1 + n].gather(1, seq[0, len(p):, None]).squeeze(1)
        torch.testing.assert_close(g.logprobs[i, :n], expected, atol=2e-5, rtol=0)
        assert (g.logprobs[i, n:] == 0).all() and (g.tokens[i, n:] == PAD).all()


def test_trainer_batch_recomputes_the_rollout_logprobs():
    m = _model()
    prompts = _prompts()
    g = generate(m, prompts, SamplingConfig(max_new_tokens=5), stop_ids=[EOS], pad_id=PAD,
                 generator=torch.Generator().manual_seed(2))
    b = sequence_layout(prompts, g.tokens, g.lengths, PAD)
    old = completion_columns(b["input_ids"].shape[1], g.logprobs)
    new = token_logprobs(m, b["input_ids"], b["attention_mask"])
    mask = b["loss_mask"].bool()
    assert int(mask.sum()) == int(g.lengths.sum())
    torch.testing.assert_close(new[mask], old[mask], atol=2e-5, rtol=0)


class _Scripted(torch.nn.Module):
    """A 'model' whose next token is fixed per row and step: checks stop handling exactly."""

    def __init__(self, script):
        super().__init__()
        self.script = script  # [B, steps] token ids

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, position_ids=None):
        from models.gpt import CausalLMOutput

        step = 0 if past_key_values is None else past_key_values
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], 259), -1e9)
        logits[:, -1].scatter_(1, self.script[:, step:step + 1], 0.0)
        return CausalLMOutput(logits=logits, past_key_values=step + 1)


def test_stop_tokens_end_rows_and_are_kept():
    script = torch.tensor([[65, EOS, 66, 67], [65, 66, 67, 68], [EOS, 65, 66, 67]])
    g = generate(_Scripted(script), [[256]] * 3, SamplingConfig(max_new_tokens=4), stop_ids=[EOS], pad_id=PAD)
    assert g.lengths.tolist() == [2, 4, 1]
    assert g.finished.tolist() == [True, False, True]
    assert g.tokens.tolist() == [[65, EOS, PAD, PAD], [65, 66, 67, 68], [EOS, PAD, PAD, PAD]]
    torch.testing.assert_close(g.logprobs[0, :2], torch.zeros(2))  # probability 1 each


def test_left_pad_aligns_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(probs.log(), 0.75)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = top_p_filter(probs.log(), 0.4)  # the top token alone reaches it
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_top_p_sampling_never_draws_outside_the_nucleus():
    logits = torch.tensor([[2.0, 1.9, -3.0, -3.0]]).repeat(2000, 1)
    probs = top_p_filter(logits, 0.9).softmax(-1)
    draws = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))
    assert set(draws.flatten().tolist()) == {0, 1}
