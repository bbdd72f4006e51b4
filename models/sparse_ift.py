"""Sparse Iso-FLOP Transformations (Sparse-IFT; Thangarasa et al., ICML 2024; code
CerebrasResearch/Sparse-IFT): spend sparsity on capacity. A dense layer is replaced by a sparse
construction of the same FLOPs; one knob, the sparsity s of the sparse parts, with k = 1/(1-s).

For a linear layer x -> W x with W [d_out, d_in] (d_in d_out multiply-adds per token):
- wide: the layer's widened dimension grows k-fold at density 1-s, FLOPs (1-s) k d_in d_out =
  d_in d_out. The reference widens every CNN channel by sqrt(k), so each conv (both of whose
  dims widen) grows k-fold. A transformer block keeps its residual width d (embeddings, norms,
  attention scores and the head stay as they are), so only a block's inner dimension can widen,
  and a linear with one widened dimension needs it k-fold. We widen the MLP's inner dimension
  (4d -> round(4d k); c_fc and the MLP's c_proj are sparse) and leave attention dense and
  unwidened (choice): widening the attention's inner dimension would grow the attention-score
  GEMMs (QK^T, AV: dense, no weights to sparsify) k-fold as well, +22 % FLOPs per token for the
  default gpt_small at s = 0.75, no longer iso-FLOP.
- parallel: k = round(1/(1-s)) sparse copies of the layer, outputs summed (the reference's
  BlockISOFlopParallel also gives each branch its own BatchNorm; a transformer has none there);
  FLOPs k (1-s) d_in d_out. 1/(1-s) must be an integer within 1 % (s = 0.5, 0.75, 0.9, ...).
- factorized: W = V U, U [r, d_in] and V [d_out, r] both sparse, r = ceil(d_in d_out /
  ((1-s)(d_in + d_out))) (the reference's LowRankConv3x3.isoflop_width_control, linear case).
- doped: a sparse W plus a dense low-rank V U, r = floor(s d_in d_out / (d_in + d_out)) (the
  reference's DopedConv3x3): the low-rank part spends exactly the FLOPs the sparsity saved.
parallel, factorized and doped transform all four block linears (attention c_attn and c_proj,
MLP c_fc and c_proj). The sparse parts are trained by sparsity=rigl or sparsity=static at density
1-s, uniform across them (launch/config.py sets sparsity.density, distribution and include from
`sparse_parameter_patterns`), as the reference does (RigL: update every 100 steps, drop fraction
0.3, cosine, uniform, random init).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

SPARSE_IFT_KINDS = ("none", "wide", "parallel", "factorized", "doped")
SPARSE_IFT_METHODS = ("rigl", "static")  # what trains the sparse parts (the reference's choices)


class SparseIFTConfigError(ValueError):
    """A sparse_ift config that cannot work; the message names the key."""


@dataclass
class SparseIFTConfig:
    kind: str = "none"  # none | wide | parallel | factorized | doped
    sparsity: float = 0.5  # s of the sparse parts (k = 1 / (1 - s))


def validate_sparse_ift(cfg: SparseIFTConfig) -> None:
    if cfg.kind not in SPARSE_IFT_KINDS:
        raise SparseIFTConfigError(f"sparse_ift={cfg.kind!r} is unknown; expected one of {list(SPARSE_IFT_KINDS)}")
    if cfg.kind == "none":
        return
    if not 0.0 < cfg.sparsity < 1.0:
        raise SparseIFTConfigError(f"sparse_ift.sparsity={cfg.sparsity!r}; expected a value in (0, 1)")
    if cfg.kind == "parallel":
        k = 1.0 / (1.0 - cfg.sparsity)
        if abs(round(k) - k) > 0.01 * k:
            raise SparseIFTConfigError(
                f"sparse_ift=parallel with sparse_ift.sparsity={cfg.sparsity}: 1/(1-s) = {k:.3f} branches is not "
                f"an integer, so no branch count is iso-FLOP; use s = 1 - 1/k (0.5, 0.75, 0.9, ...)"
            )


def scale(sparsity: float) -> float:
    """k = 1 / (1 - s)."""
    return 1.0 / (1.0 - sparsity)


def wide_mlp_hidden(n_embd: int, sparsity: float) -> int:
    """The MLP's inner width under `wide`: round(4 d k)."""
    return int(round(4 * n_embd * scale(sparsity)))


def parallel_branches(sparsity: float) -> int:
    return int(round(scale(sparsity)))


def factorized_rank(d_in: int, d_out: int, sparsity: float) -> int:
    return int(math.ceil(d_in * d_out / ((1.0 - sparsity) * (d_in + d_out))))


def doped_rank(d_in: int, d_out: int, sparsity: float) -> int:
    return int(math.floor(sparsity * d_in * d_out / (d_in + d_out)))


class ParallelLinear(nn.Module):
    """y = sum_b (W_b x + b_b): `branches` linears of the same shape (sparse parts)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, branches: int):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d_in, d_out, bias=bias) for _ in range(branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class FactorizedLinear(nn.Module):
    """y = V (U x) + b: u [rank, d_in] and v [d_out, rank] (both sparse parts)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, rank: int):
        super().__init__()
        self.u = nn.Linear(d_in, rank, bias=False)
        self.v = nn.Linear(rank, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.u(x))


class DopedLinear(nn.Module):
    """y = W x + V (U x) + b: `sparse` is the sparse W, lowrank_u / lowrank_v the dense low-rank part."""

    def __init__(self, d_in: int, d_out: int, bias: bool, rank: int):
        super().__init__()
        self.sparse = nn.Linear(d_in, d_out, bias=bias)
        self.lowrank_u = nn.Linear(d_in, rank, bias=False)
        self.lowrank_v = nn.Linear(rank, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse(x) + self.lowrank_v(self.lowrank_u(x))


def block_linear(kind: str, sparsity: float, d_in: int, d_out: int, bias: bool, transformed: bool) -> nn.Module:
    """A block's linear layer under `kind`; `transformed` False (attention under `wide`) or
    kind none gives a plain nn.Linear."""
    if kind in ("none", "wide") or not transformed:
        return nn.Linear(d_in, d_out, bias=bias)
    if kind == "parallel":
        return ParallelLinear(d_in, d_out, bias, parallel_branches(sparsity))
    if kind == "factorized":
        return FactorizedLinear(d_in, d_out, bias, factorized_rank(d_in, d_out, sparsity))
    if kind == "doped":
        return DopedLinear(d_in, d_out, bias, doped_rank(d_in, d_out, sparsity))
    raise SparseIFTConfigError(f"sparse_ift={kind!r} is unknown; expected one of {list(SPARSE_IFT_KINDS)}")


def sparse_module_patterns(kind: str) -> list[str]:
    """fnmatch patterns of the module names of the built-in GPT's sparse parts under `kind`
    (what sparsity.include becomes)."""
    return {
        "wide": ["h.*.mlp.c_fc", "h.*.mlp.c_proj"],
        "parallel": ["h.*.branches.*"],
        "factorized": ["h.*.u", "h.*.v"],
        "doped": ["h.*.sparse"],
    }[kind]
