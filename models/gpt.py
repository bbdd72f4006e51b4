"""The built-in GPT: a small decoder-only transformer, readable top to bottom (after nanoGPT).

It speaks the same call convention as a Hugging Face causal LM, so the trainer, the rollout
engine and the synchronizer never need to know which one they hold:

    out = model(input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False)
    out.logits            # [batch, time, vocab]
    out.past_key_values   # per layer (k, v), each [batch, heads, time_so_far, head_dim]

`attention_mask` is [batch, time_so_far + time] with 1 for real tokens and 0 for padding
(left padding in batched generation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sparse_ift import FactorizedLinear, block_linear, wide_mlp_hidden


def _feeds_residual(name: str) -> bool:
    """A weight whose output is added to the residual stream: c_proj's, or under Sparse-IFT the
    c_proj parts that produce its output (each parallel branch, factorized v, doped sparse and
    lowrank_v)."""
    if not name.endswith(".weight") or ".c_proj" not in name:
        return False
    part = name[name.index(".c_proj") + len(".c_proj"):-len(".weight")]
    return part == "" or part.startswith(".branches.") or part in (".v", ".sparse", ".lowrank_v")


@dataclass
class GPTConfig:
    vocab_size: int = 259  # 256 bytes + BOS/EOS/PAD, see models/tokenizer.py
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    # Sparse Iso-FLOP transformation of the block linears (models/sparse_ift.py)
    sparse_ift: str = "none"  # none | wide | parallel | factorized | doped
    sparse_ift_sparsity: float = 0.0

    @property
    def mlp_hidden(self) -> int:
        """The MLP's inner width: 4 n_embd, widened k-fold under sparse_ift=wide."""
        if self.sparse_ift == "wide":
            return wide_mlp_hidden(self.n_embd, self.sparse_ift_sparsity)
        return 4 * self.n_embd

    def linear(self, d_in: int, d_out: int, mlp: bool) -> nn.Module:
        """A block linear; `wide` transforms only the MLP's (see models/sparse_ift.py)."""
        transformed = mlp or self.sparse_ift != "wide"
        return block_linear(self.sparse_ift, self.sparse_ift_sparsity, d_in, d_out, self.bias, transformed)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    past_key_values: tuple | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.c_attn = cfg.linear(cfg.n_embd, 3 * cfg.n_embd, mlp=False)
        self.c_proj = cfg.linear(cfg.n_embd, cfg.n_embd, mlp=False)
        self.dropout = cfg.dropout

    def forward(self, x, attn_bias, past_kv):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = cfg.linear(cfg.n_embd, cfg.mlp_hidden, mlp=True)
        self.c_proj = cfg.linear(cfg.mlp_hidden, cfg.n_embd, mlp=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_bias, past_kv):
        a, kv = self.attn(self.ln_1(x), attn_bias, past_kv)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for module in self.modules():  # Sparse-IFT factorized: V U starts with the dense init's scale
            if isinstance(module, FactorizedLinear):
                std = math.sqrt(0.02 / math.sqrt(module.u.out_features))
                nn.init.normal_(module.u.weight, mean=0.0, std=std)
                nn.init.normal_(module.v.weight, mean=0.0, std=std)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if not _feeds_residual(name):
                continue
            if name.endswith(".c_proj.v.weight"):  # factorized: scale V, so V U scales like c_proj
                with torch.no_grad():
                    p.mul_(1.0 / math.sqrt(2 * cfg.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        B, T = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)[None]
        if int(position_ids.max()) >= self.config.block_size:
            raise ValueError(
                f"sequence position {int(position_ids.max())} exceeds model.block_size={self.config.block_size}"
            )
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        attn_bias = self._attention_bias(B, T, past_len, attention_mask, x.dtype, x.device)
        presents = []
        for i, block in enumerate(self.h):
            x, kv = block(x, attn_bias, None if past_key_values is None else past_key_values[i])
            presents.append(kv)
        logits = self.lm_head(self.ln_f(x))
        return CausalLMOutput(logits=logits, past_key_values=tuple(presents) if use_cache else None)

    @staticmethod
    def _attention_bias(B, T, past_len, attention_mask, dtype, device) -> torch.Tensor:
        """Additive mask [B or 1, 1, T, past_len + T]: causal, and padding keys hidden."""
        S = past_len + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past_len)
        allowed = causal[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()
            # A padding query row may see nothing at all; let it see itself to keep softmax finite.
            diagonal = torch.zeros(T, S, dtype=torch.bool, device=device)
            diagonal[torch.arange(T), torch.arange(past_len, S)] = True
            allowed = allowed | diagonal[None, None]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
