"""Batched sampling with a KV cache on the models/gpt.py call convention.

Prompts are left-padded to one length, so every row's next token sits in the last column and one
cached forward per step serves the whole batch. The model is treated as an HF-like causal LM:
`model(input_ids, attention_mask=..., past_key_values=..., use_cache=True)` returns `.logits` and
an opaque `.past_key_values` that is only handed back to the model, never inspected.

Logprobs: `logprobs[b, t]` is log softmax(logits / temperature) at the sampled token, i.e. the
temperature-scaled distribution *before* top-p truncation. The trainer recomputes the same
quantity (same temperature) from the same tokens, so the two agree up to numerics; with
top_p < 1 the sampled distribution is the truncated one, which the ratio then ignores
(as in veRL/OpenRLHF).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    greedy: bool = False  # argmax instead of sampling (evaluation); logprobs as above


@dataclass
class Generation:
    """One batch of completions, aligned with the prompts it was given.

    tokens:   [B, T] sampled ids; positions after a row's stop token hold `pad_id`.
    logprobs: [B, T] float32 logprob of each sampled token (0 past the row's end).
    lengths:  [B] number of generated tokens, the stop token included.
    finished: [B] True when the row ended on a stop token (False: hit max_new_tokens).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor


class SamplingConfigError(ValueError):
    pass


def check_sampling(cfg: SamplingConfig) -> None:
    if not cfg.temperature > 0:
        raise SamplingConfigError(f"rollout.temperature={cfg.temperature} must be > 0")
    if not 0 < cfg.top_p <= 1:
        raise SamplingConfigError(f"rollout.top_p={cfg.top_p} must be in (0, 1]")
    if cfg.max_new_tokens < 1:
        raise SamplingConfigError(f"rollout.max_new_tokens={cfg.max_new_tokens} must be >= 1")


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Return (ids [B, P], attention_mask [B, P]) with every sequence right-aligned."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    *,
    stop_ids: list[int] | tuple[int, ...],
    pad_id: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Generation:
    """Sample up to `cfg.max_new_tokens` tokens after each prompt (a list of token ids)."""
    check_sampling(cfg)
    ids, mask = left_pad(prompts, pad_id, device)
    B = ids.shape[0]
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    tokens = torch.full((B, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, cfg.max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)

    out = model(ids, attention_mask=mask, use_cache=True)
    past = out.past_key_values
    step_logits = out.logits[:, -1]
    for t in range(cfg.max_new_tokens):
        scaled = step_logits.float() / cfg.temperature
        logp_all = scaled.log_softmax(-1)
        probs = top_p_filter(scaled, cfg.top_p).softmax(-1)
        if cfg.greedy:
            nxt = scaled.argmax(-1)
        else:
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        live = ~done
        tokens[:, t] = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        logprobs[:, t] = torch.where(live, logp_all.gather(1, nxt[:, None]).squeeze(1), 0.0)
        lengths += live.long()
        done = done | (live & torch.isin(nxt, stop))
        if bool(done.all()) or t == cfg.max_new_tokens - 1:
            break
        # Finished rows feed padding that no later token attends to (mask 0).
        mask = torch.cat([mask, live.long()[:, None]], dim=1)
        out = model(tokens[:, t:t + 1], attention_mask=mask, past_key_values=past, use_cache=True)
        past = out.past_key_values
        step_logits = out.logits[:, -1]
    return Generation(tokens=tokens, logprobs=logprobs, lengths=lengths, finished=done)

