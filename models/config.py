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
    # Sparse-IFT (models/sparse_ift.py): filled from the job's top-level `sparse_ift` group by
    # launch/config.py (resolve_sparse_ift); set that group, not these
    sparse_ift: str = "none"
    sparse_ift_sparsity: float = 0.0
    # Hugging Face
    path: str | None = None
    dtype: str = "float32"  # dtype the trainer's master weights start in
    # true: build config.json's architecture with fresh random weights (transformers' init) and
    # train it from scratch; the directory's weights, if any, are not read. Sparse-IFT needs it.
    from_scratch: bool = False

    @property
    def pretrained(self) -> bool:
        """The model starts from trained weights (an HF checkpoint, not built from scratch)."""
        return self.kind == "hf" and not self.from_scratch
