"""Model config: which model to build. `kind=gpt` is the built-in GPT; `kind=hf` loads a local
Hugging Face causal LM directory (see models/hf.py, when present)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    kind: str = "gpt"  # gpt | hf
    # built-in GPT
    vocab_size: int = 259
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # kind=hf too: sets every *dropout/*pdrop of its config.json
    bias: bool = True
    tie_embeddings: bool = True
    # Hugging Face
    path: str | None = None
    dtype: str = "float32"  # dtype the trainer's master weights start in
