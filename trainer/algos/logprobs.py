"""The trainer's view of the logprobs a rollout recorded (see rollout/generation.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyOutput:
    """Per token of a batch [B, T] (column 0 is 0: nothing predicts the first token)."""
    logp: torch.Tensor  # float32 log softmax(logits / temperature) of token t given tokens < t
    entropy: torch.Tensor  # float32 entropy of that distribution (no gradient)
    hidden: torch.Tensor | None = None  # [B, T, H] the final hidden state that predicts token t


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, T] float32: log softmax(logits / temperature) of token t given tokens < t; column 0 is 0."""
    return policy_forward(model, input_ids, attention_mask, temperature).logp


def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps the final hidden state to logits (HF `get_output_embeddings`, or the
    built-in GPT's `lm_head`), through a DeepSpeed engine's wrapper."""
    inner = getattr(model, "module", model)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if getter is not None else getattr(inner, "lm_head", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output layer (lm_head) to read hidden states from")
    return head


def policy_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, with_hidden: bool = False) -> PolicyOutput:
    """One forward pass: token logprobs, entropies and (with_hidden) the final hidden states,
    read as the input of the output layer so any model on the models/ call convention works."""
    captured: list[torch.Tensor] = []
    hook = None
    if with_hidden:
        hook = output_layer(model).register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        logits = model(input_ids, attention_mask=attention_mask).logits
    finally:
        if hook is not None:
            hook.remove()
    logp_all = (logits[:, :-1].float() / temperature).log_softmax(-1)
    picked = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(picked[:, :1])
    hidden = None
    if with_hidden:
        h = captured[-1]
        hidden = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # position t: state after t - 1
    return PolicyOutput(torch.cat([zero, picked], dim=1), torch.cat([zero, entropy], dim=1), hidden)


def reference_logprobs(batch: dict[str, torch.Tensor], reference: torch.nn.Module | None,
                       temperature: float) -> torch.Tensor:
    """Token logprobs of the KL reference policy: the batch's `ref_logprobs` when the driver sent
    them, else computed here with the frozen `reference` model (no gradient)."""
    ref = batch.get("ref_logprobs")
    if ref is not None:
        return ref.float()
    if reference is None:
        raise ValueError("algo.kl_coef > 0 needs batch['ref_logprobs'] or set_reference(model)")
    with torch.no_grad():
        return token_logprobs(reference, batch["input_ids"], batch["attention_mask"], temperature)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask == 1 (token-level: every completion token in the batch weighs the same)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
