"""The rollout engine: what a rollout worker generates with.

The worker, the trainer and the synchronizer only see this interface, so another engine (a
Hugging Face model's own generate, vLLM on GPU) can replace `TorchEngine` without touching them:

    engine.weights() -> dict[str, Tensor]   tensors a WeightReceiver updates in place
    engine.generate(prompt_ids, sampling, generator) -> Generation
    engine.tokenizer                         encode/decode, bos/eos/pad ids
"""
from __future__ import annotations

from typing import Protocol

import torch

from rollout.generation import Generation, SamplingConfig, generate


class RolloutEngine(Protocol):
    tokenizer: object

    def weights(self) -> dict[str, torch.Tensor]: ...

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> Generation: ...


class TorchEngine:
    """Any module on the models/gpt.py call convention, sampled by rollout/generation.py."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: str = "cpu", dtype: str = "bfloat16"):
        from models.hf import cast_parameters

        self.device = device
        # Parameters and persistent buffers to `dtype`; derived constants (an HF model's RoPE
        # inv_freq) stay fp32 as in transformers' own bf16 loading: `.to(bf16)` would round them
        # and shift rotary angles by up to ~2^-9 * position rad away from the trainer's.
        self.model = cast_parameters(model.to(device), getattr(torch, dtype)).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def weights(self) -> dict[str, torch.Tensor]:
        # named_parameters lists a tied tensor once, as the trainer publishes it.
        return {name: p.data for name, p in self.model.named_parameters()}

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> Generation:
        g = generate(self.model, prompt_ids, sampling, stop_ids=[self.tokenizer.eos_id],
                     pad_id=self.tokenizer.pad_id, generator=generator, device=self.device)
        return Generation(g.tokens.cpu(), g.logprobs.cpu(), g.lengths.cpu(), g.finished.cpu())
