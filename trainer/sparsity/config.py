"""Sparsity config: one flat dataclass (a Hydra structured config, group `sparsity/`).

conf/sparsity/{dense,nm,rigl,set,static,magnitude}.yaml select `method` and its defaults.
Fields a method does not use are ignored by it. Defaults come from the papers
(/work/shared/design/ALGORITHMS.md), never from our benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

METHODS = ("dense", "nm", "rigl", "set", "static", "magnitude")
ESTIMATORS = ("sr_ste", "ste")
GRADIENT_FLOWS = ("none", "mdgf_linear", "mdgf_exp", "sdgf")
SDGF_SCHEDULES = ("sparsify", "densify", "fine", "custom")
DISTRIBUTIONS = ("erk", "uniform")
STATIC_INITS = ("random", "magnitude")

# Linear layers inside a numbered list of blocks (`h.0.attn.c_attn`, `model.layers.3.mlp.up_proj`):
# the transformer blocks of the built-in GPT and of Hugging Face causal LMs. Embeddings, the head,
# norms and biases are never candidates (only Linear/Conv1D weights are).
DEFAULT_INCLUDE = ["*.[0-9]*"]


@dataclass
class SparsityConfig:
    method: str = "dense"  # dense | nm | rigl | set | static | magnitude

    # --- N:M fine-grained structured sparsity (Zhou et al. 2021) ---
    n: int = 2
    m: int = 4
    estimator: str = "sr_ste"  # sr_ste | ste
    sr_ste_lambda: float = 2e-4  # the paper's lambda_W
    mask_interval: int = 1  # recompute the N:M mask from the dense weights every this many steps

    # --- progressive gradient flow (Bambhaniya et al. 2024), N:M only ---
    gradient_flow: str = "none"  # none | mdgf_linear | mdgf_exp | sdgf
    decay_coef: float = 2e-4  # MDGF c: beta(t) = max(0, 1 - c (t - t0)) or exp(-c (t - t0)); ref code default
    dense_fraction: float = 0.0  # fraction of steps trained dense at the start (ref code default 0)
    fine_tune_fraction: float = 0.0  # fraction of steps at the end with the hard N:M mask (beta = 0)
    sdgf_schedule: str = "sparsify"  # sparsify | densify | fine | custom
    sdgf_stages: list[str] = field(default_factory=list)  # custom stages, e.g. ["4:8", "2:8", "1:8"]

    # --- unstructured: dynamic (SET, RigL), static, gradual magnitude pruning ---
    density: float = 0.1  # target fraction of active weights over the sparsified layers
    distribution: str = "erk"  # erk | uniform
    update_interval: int = 100  # RigL/SET: Delta_T
    drop_fraction: float = 0.3  # RigL/SET: alpha, cosine-decayed
    end_fraction: float = 0.75  # RigL/SET: no mask updates from this fraction of training on
    init: str = "random"  # static: random | magnitude
    prune_start_fraction: float = 0.0  # magnitude: t0 as a fraction of training
    prune_end_fraction: float = 0.75  # magnitude: t0 + n*dt as a fraction of training
    prune_interval: int = 100  # magnitude: dt
    initial_sparsity: float = 0.0  # magnitude: s_i
    seed: int = 0  # random masks (SET regrowth, static/RigL init): identical on every rank

    # --- which weights ---
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))  # fnmatch on module names
    exclude: list[str] = field(default_factory=list)
    # per-layer overrides, first matching pattern wins: {"h.0.*": {"n": 4, "m": 8}} or {"h.3.mlp.*": {"density": 0.3}}
    overrides: dict[str, Any] = field(default_factory=dict)
