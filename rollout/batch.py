"""Turn prompts and completions into the trainer's batch (trainer/algos/batch.py TrainBatch).

Row layout: [left padding | prompt | completion | right padding], the same positions the rollout
saw while generating, so the trainer's recomputed logprobs match the rollout's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from rollout.generation import left_pad
from trainer.algos.batch import TrainBatch


class ChatTemplateError(ValueError):
    """Chat-message prompts for a tokenizer that has no chat template and no fallback."""


def render_plain_chat(messages: list[dict]) -> str:
    """The built-in byte tokenizer's chat template (it has none of its own): every message as
    `<|role|>` + newline + content + newline, then `<|assistant|>` + newline to answer after.
    [{"role": "user", "content": "2+2="}] -> "<|user|>\n2+2=\n<|assistant|>\n"."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def prompt_token_ids(prompt: str | list[dict], tokenizer) -> list[int]:
    """A prompt's ids: a string through models/hf_tokenizer.py's prompt_ids (the chat template
    when the tokenizer has one, else `[bos_id] + encode(text)`); chat messages through the
    tokenizer's chat template, or render_plain_chat for the byte tokenizer."""
    from models.hf_tokenizer import prompt_ids
    from models.tokenizer import ByteTokenizer

    if isinstance(prompt, str):
        return prompt_ids(tokenizer, prompt)
    if getattr(tokenizer, "has_chat_template", False):
        return tokenizer.encode(tokenizer.apply_chat_template(list(prompt)))
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.bos_id] + tokenizer.encode(render_plain_chat(prompt))
    raise ChatTemplateError(f"the prompts are chat messages but the tokenizer ({type(tokenizer).__name__}) has no chat "
                            "template; use a model whose tokenizer_config.json has one, or plain-string prompts")


def encode_prompts(prompts: list, tokenizer) -> list[list[int]]:
    """Prompt ids for every prompt (string or chat messages; see prompt_token_ids)."""
    return [prompt_token_ids(p, tokenizer) for p in prompts]


def sequence_layout(prompt_ids: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor,
                    pad_id: int) -> dict[str, torch.Tensor]:
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


class Rollout(Protocol):
    """What a batch is built from: one worker's share (rollout/results.py RolloutBatch)."""

    version: int
    prompt_ids: list[list[int]]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    rewards: torch.Tensor

    @property
    def size(self) -> int: ...


def rl_batch(shares: Sequence[Rollout], trainer_version: int,
             estimator: Callable[[torch.Tensor, int], torch.Tensor] | None, group_size: int, pad_id: int) -> TrainBatch:
    """The rollout shares -> one RL TrainBatch: the rows in order, the rollout logprobs in their
    columns, and the advantages from the driver's estimator (None for PPO: its value head
    estimates them on the trainer)."""
    rewards = torch.cat([s.rewards for s in shares])
    versions = torch.cat([torch.full((s.size,), s.version) for s in shares])
    layout = sequence_layout([p for s in shares for p in s.prompt_ids], torch.cat([s.tokens for s in shares]),
                             torch.cat([s.lengths for s in shares]), pad_id)
    return TrainBatch(
        **layout, rewards=rewards, current_version=versions == trainer_version,
        old_logprobs=completion_columns(layout["input_ids"].shape[1], torch.cat([s.logprobs for s in shares])),
        advantages=None if estimator is None else estimator(rewards, group_size),
    )


def sft_batch(prompts: list, answers: list[str], tokenizer) -> TrainBatch:
    """Prompts followed by their correct answers and the stop token, loss on the answers."""
    completions = [tokenizer.encode(a) + [tokenizer.eos_id] for a in answers]
    width = max(len(c) for c in completions)
    tokens = torch.full((len(completions), width), tokenizer.pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        tokens[i, : len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in completions])
    return TrainBatch(**sequence_layout(encode_prompts(prompts, tokenizer), tokens, lengths, tokenizer.pad_id))
