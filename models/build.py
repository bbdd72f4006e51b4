"""One place that turns a ModelConfig into (model, tokenizer)."""
from __future__ import annotations

from models.config import ModelConfig
from models.gpt import GPT, GPTConfig
from models.tokenizer import ByteTokenizer, Tokenizer


class ModelConfigError(ValueError):
    pass


def build_model(cfg: ModelConfig):
    """Return (torch.nn.Module, Tokenizer) for `cfg`. The module follows models/gpt.py's call
    convention whatever its kind."""
    if cfg.kind == "gpt":
        tok: Tokenizer = ByteTokenizer()
        if cfg.vocab_size < tok.vocab_size:
            raise ModelConfigError(
                f"model.vocab_size={cfg.vocab_size} is smaller than the byte tokenizer's {tok.vocab_size}"
            )
        gpt_cfg = GPTConfig(
            vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
            tie_embeddings=cfg.tie_embeddings, sparse_ift=cfg.sparse_ift, sparse_ift_sparsity=cfg.sparse_ift_sparsity,
        )
        return GPT(gpt_cfg), tok
    if cfg.kind == "hf":
        try:
            from models.hf import load_hf_model
        except ImportError as e:  # pragma: no cover - until models/hf.py lands
            raise ModelConfigError("model.kind=hf is not available in this build") from e
        return load_hf_model(cfg)
    raise ModelConfigError(f"model.kind={cfg.kind!r} is unknown; expected 'gpt' or 'hf'")
