"""The trainer's view of the logprobs a rollout recorded (see rollout/generation.py)."""
from __future__ import annotations

import torch


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, T] float32: log softmax(logits / temperature) of token t given tokens < t; column 0 is 0."""
    logits = model(input_ids, attention_mask=attention_mask).logits
    logp = (logits[:, :-1].float() / temperature).log_softmax(-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


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
