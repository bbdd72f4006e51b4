"""Turn prompts and completions into the trainer's batch layout (see trainer/algos/__init__.py).

Row layout: [left padding | prompt | completion | right padding], the same positions the rollout
saw while generating, so the trainer's recomputed logprobs match the rollout's.
"""
from __future__ import annotations

import torch

from rollout.generation import left_pad


def encode_prompts(texts: list[str], tokenizer) -> list[list[int]]:
    """Prompt ids: through the tokenizer's chat template when it has one (an HF model's own
    tokenizer), else `[bos_id] + encode(text)` (see models/hf_tokenizer.py: prompt_ids)."""
    from models.hf_tokenizer import prompt_ids

    return [prompt_ids(tokenizer, t) for t in texts]


def train_batch(
    prompt_ids: list[list[int]],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / loss_mask for prompts followed by `tokens[:, :lengths]`."""
    p_ids, p_mask = left_pad(prompt_ids, pad_id)
    T = tokens.shape[1]
    c_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return {
        "input_ids": torch.cat([p_ids, tokens.masked_fill(c_mask == 0, pad_id)], 1),
        "attention_mask": torch.cat([p_mask, c_mask], 1),
        "loss_mask": torch.cat([torch.zeros_like(p_mask), c_mask], 1).float(),
    }


def completion_columns(batch_width: int, values: torch.Tensor) -> torch.Tensor:
    """Place per-completion-token values [B, T] in the last T columns of a [B, batch_width] row."""
    out = torch.zeros(values.shape[0], batch_width, dtype=values.dtype)
    out[:, batch_width - values.shape[1]:] = values
    return out


def sft_batch(prompts: list[str], answers: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """Prompts followed by their correct answers and the stop token, loss on the answers."""
    completions = [tokenizer.encode(a) + [tokenizer.eos_id] for a in answers]
    width = max(len(c) for c in completions)
    tokens = torch.full((len(completions), width), tokenizer.pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        tokens[i, : len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in completions])
    return train_batch(encode_prompts(prompts, tokenizer), tokens, lengths, tokenizer.pad_id)
