"""`rollout.engine=torch`: our own batched sampling loop (rollout/generation.py) over the model's
forward. The model's parameters are the committed weights: a WeightReceiver writes them in place,
so there is nothing to hand over after a commit."""
from __future__ import annotations

import torch

from rollout.generation import Generation, SamplingConfig, generate


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

    def load_weights(self, names: list[str]) -> None:
        """Nothing to do: the receiver wrote the model's own parameters."""

    def logprob_diff_vs_committed(self) -> float | None:
        """None: the model computes with the committed tensors themselves (their digest is the check)."""
        return None

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> Generation:
        g = generate(self.model, prompt_ids, sampling, stop_ids=[self.tokenizer.eos_id],
                     pad_id=self.tokenizer.pad_id, generator=generator, device=self.device)
        return Generation(g.tokens.cpu(), g.logprobs.cpu(), g.lengths.cpu(), g.finished.cpu())
