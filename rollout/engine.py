"""The rollout engine: what a rollout worker generates with, behind one small interface.

The worker, the trainer and the synchronizer only see this interface; `rollout.engine` picks the
implementation, one file each:

- `torch`: rollout/torch_engine.py, our batched KV-cache loop (rollout/generation.py) over the
  model's own forward; the built-in GPT and any Hugging Face causal LM.
- `vllm`: rollout/vllm_engine.py, vLLM in the worker's process (Hugging Face Llama, Qwen2 and
  GPT-2 checkpoints: the architectures whose layer-by-layer weight hand-over is verified).

    engine.weights() -> dict[str, Tensor]   the committed weights in checkpoint coordinates, by the
                                             names the trainer publishes; a WeightReceiver writes
                                             them in place (they are its verified target)
    engine.load_weights(names)               after a commit: hand the engine the tensors `names`
                                             (only those that changed); a no-op when weights() are
                                             the engine's own tensors (torch)
    engine.logprob_diff_vs_committed() -> float | None
                                             what the engine computes against the committed
                                             weights (weight checks); None when it computes with
                                             them directly (torch)
    engine.generate(prompt_ids, sampling, generator) -> Generation
    engine.tokenizer                         encode/decode, bos/eos/pad ids
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from rollout.generation import Generation, SamplingConfig

if TYPE_CHECKING:
    from models import ModelConfig
    from models.tokenizer import Tokenizer
    from rollout.config import RolloutConfig

class EngineUpdateError(RuntimeError):
    """The engine failed to take committed weights: it may hold a mix of two versions, so the
    worker refuses to generate and must be rebuilt from a snapshot."""


class EngineStartError(RuntimeError):
    """The engine could not be built for this model or these settings (named in the message)."""


class RolloutEngine(Protocol):
    tokenizer: Tokenizer

    def weights(self) -> dict[str, torch.Tensor]: ...

    def load_weights(self, names: list[str]) -> None: ...

    def logprob_diff_vs_committed(self) -> float | None: ...

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> Generation: ...


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_engine(model_cfg: ModelConfig, cfg: RolloutConfig, seed: int) -> RolloutEngine:
    """The engine `cfg.engine` names, holding `model_cfg`'s model on `cfg.device`."""
    device = resolve_device(cfg.device)
    if cfg.engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_cfg, cfg, seed, device)
    from models import build_model
    from rollout.torch_engine import TorchEngine

    model, tokenizer = build_model(model_cfg)
    return TorchEngine(model, tokenizer, device=device, dtype=cfg.dtype)
