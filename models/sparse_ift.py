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
`sparse_module_patterns`), as the reference does (RigL: update every 100 steps, drop fraction
0.3, cosine, uniform, random init).

model=hf: a Llama-family causal LM (model_type in `HF_FAMILIES`: Llama, Mistral, Qwen2) trained
from scratch (model.from_scratch=true: config.json's architecture, fresh weights; models/hf.py).
A pretrained checkpoint is refused: Sparse-IFT is a different architecture trained from random
init, not a transformation of trained weights. The constructions are the GPT's, on the Llama
block's seven linears (`HF_BLOCK_LINEARS`):
- wide: intermediate_size -> round(intermediate_size k) (`wide_width`); gate_proj, up_proj and
  down_proj are sparse; attention stays dense and unwidened (the same reasoning as above). The
  model is an ordinary Llama of that intermediate_size (`hf_wide_config`).
- parallel, factorized, doped: each of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and
  down_proj is replaced in place by block_linear's module (`transform_hf_decoder`), so parameter
  names are the Llama's plus the construction's part: model.layers.0.self_attn.q_proj.branches.1.weight,
  ....mlp.down_proj.u.weight, ....sparse.weight. New weights start as transformers' Llama init
  (normal, std initializer_range; biases zero), factorized U and V scaled so V U has that std.
Export: `wide` exports as a normal save_pretrained Llama of the widened intermediate_size
(AutoModelForCausalLM loads it). parallel/factorized/doped are not a transformers architecture:
they export in the project's own layout, as the built-in GPT does (models/export.py
export_sparse_ift_hf_directory: config.json {"model_type": "sparsetrain-sparse-ift-hf",
"hf_config", "sparse_ift"}, model.safetensors under the names above, tokenizer files;
load_sparse_ift_hf_directory loads it back); its model_type makes a vanilla from_pretrained fail
loudly instead of initialising the missing Llama weights at random.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

SPARSE_IFT_KINDS = ("none", "wide", "parallel", "factorized", "doped")
SPARSE_IFT_METHODS = ("rigl", "static")  # what trains the sparse parts (the reference's choices)
# model=hf: the config.json model types whose decoder layers have the Llama block's linears
HF_FAMILIES = ("llama", "mistral", "qwen2")
HF_BLOCK_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


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


def wide_width(inner: int, sparsity: float) -> int:
    """An MLP inner width under `wide`: round(inner k)."""
    return int(round(inner * scale(sparsity)))


def wide_mlp_hidden(n_embd: int, sparsity: float) -> int:
    """The built-in GPT's MLP inner width under `wide`: round(4 d k)."""
    return wide_width(4 * n_embd, sparsity)


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


def sparse_module_patterns(kind: str, model_kind: str = "gpt") -> list[str]:
    """fnmatch patterns of the module names of the sparse parts under `kind` (what
    sparsity.include becomes): the built-in GPT's (model_kind gpt) or a Llama-family model's (hf)."""
    if model_kind == "hf":
        return {
            "wide": [f"model.layers.*.mlp.{name}" for name in HF_BLOCK_LINEARS["mlp"]],
            "parallel": ["model.layers.*.branches.*"],
            "factorized": ["model.layers.*.u", "model.layers.*.v"],
            "doped": ["model.layers.*.sparse"],
        }[kind]
    return {
        "wide": ["h.*.mlp.c_fc", "h.*.mlp.c_proj"],
        "parallel": ["h.*.branches.*"],
        "factorized": ["h.*.u", "h.*.v"],
        "doped": ["h.*.sparse"],
    }[kind]


def check_hf_family(config) -> None:
    """Refuse a transformers config whose decoder is not Llama-family (SparseIFTConfigError)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_FAMILIES:
        raise SparseIFTConfigError(
            f"sparse_ift with model=hf is built for Llama-family decoders (config model_type in {list(HF_FAMILIES)}); "
            f"this model.path has model_type={model_type!r}"
        )


def hf_wide_config(config, sparsity: float):
    """A copy of a Llama-family transformers config with intermediate_size widened k-fold."""
    import copy

    check_hf_family(config)
    widened = copy.deepcopy(config)
    widened.intermediate_size = wide_width(int(config.intermediate_size), sparsity)
    return widened


def init_transformed(module: nn.Module, std: float) -> None:
    """Initialise a block_linear module like a dense linear of init std `std`: every weight
    normal(0, std), biases zero; a FactorizedLinear's U and V at sqrt(std / sqrt(rank)) each, so
    the entries of V U have std `std`."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
    if isinstance(module, FactorizedLinear):
        factor_std = math.sqrt(std / math.sqrt(module.u.out_features))
        nn.init.normal_(module.u.weight, mean=0.0, std=factor_std)
        nn.init.normal_(module.v.weight, mean=0.0, std=factor_std)


def transform_hf_decoder(model: nn.Module, kind: str, sparsity: float) -> nn.Module:
    """Apply `kind` to a Llama-family transformers causal LM built from its config (in place;
    returns it). wide: the config was widened before the build (hf_wide_config), so this only
    checks the structure; parallel/factorized/doped: every HF_BLOCK_LINEARS linear becomes
    block_linear's module under the same name, in the old weight's dtype and device."""
    config = getattr(model, "config", None)
    check_hf_family(config)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SparseIFTConfigError(f"sparse_ift={kind}: {type(model).__name__} has no model.layers to transform")
    std = float(getattr(config, "initializer_range", 0.02))
    for i, layer in enumerate(layers):
        for parent_name, names in HF_BLOCK_LINEARS.items():
            parent = getattr(layer, parent_name, None)
            for name in names:
                old = getattr(parent, name, None)
                if not isinstance(old, nn.Linear):
                    raise SparseIFTConfigError(
                        f"sparse_ift={kind}: model.layers.{i}.{parent_name}.{name} is {type(old).__name__}, "
                        f"expected an nn.Linear (a Llama-family decoder layer)"
                    )
                if kind in ("none", "wide"):
                    continue
                new = block_linear(kind, sparsity, old.in_features, old.out_features, old.bias is not None, True)
                init_transformed(new, std)
                setattr(parent, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
    return model
