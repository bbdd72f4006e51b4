"""Sparsity config: one flat dataclass (a Hydra structured config, group `sparsity/`).

conf/sparsity/{dense,nm,rigl,set,static,magnitude,scl}.yaml select `method` and its defaults.
Fields a method does not use are ignored by it. Defaults come from the papers that introduced
each method (SR-STE, RigL, SET, ...), never from our benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

METHODS = ("dense", "nm", "rigl", "set", "static", "magnitude", "scl")
ESTIMATORS = ("auto", "sr_ste", "ste")
SR_STE_FORMS = ("decoupled", "coupled")
DROP_SCHEDULES = ("cosine", "constant")
INIT_SCALES = ("none", "fan_in")
GRADIENT_FLOWS = ("none", "mdgf_linear", "mdgf_exp", "sdgf")
SDGF_SCHEDULES = ("sparsify", "densify", "fine", "custom")
BACKWARD_MODES = ("exact", "bidirectional", "transposable")
DISTRIBUTIONS = ("auto", "erk", "uniform")
INITS = ("auto", "random", "magnitude")
STATIC_INITS = INITS  # the name older code imports

# SR-STE's strength in the paper (Zhou et al. 2021): lambda_W = 2e-4 added to the gradient, trained
# with SGD, momentum 0.9, lr 0.1 (cosine). There the term is a decay of the pruned weights by
# lr_t * lambda_W / (1 - momentum) per step: 2e-4 of each pruned weight per step at the peak lr.
PAPER_SR_STE_DECAY_PER_STEP = 0.1 * 2e-4 / (1 - 0.9)

# lambda_d of the decoupled form by default (per unit of lr: W[~mask] *= 1 - lr_t * lambda_d, so it
# follows the lr schedule like AdamW's weight decay). Calibrated to the paper's decay-to-update
# ratio, not its absolute per-step decay: under the paper's SGD a step moves a weight by about 1 %
# of its magnitude, so the 2e-4 decay is ~1:50 of the update; under Adam every element moves by
# about lr per step (2e-3 at the default lr, ~10 % of a typical 0.02 weight), and 1:50 of that is
# a decay of ~2e-3 = lr * 1.0 per step. The paper's absolute 2e-4/step (lambda_d = 0.1 at lr 2e-3)
# is ~10x weaker relative to the update: 0.993x STE's pruned-to-kept norm after 150 steps, against
# 0.917x for lambda_d = 1 (README, "What the methods do").
SR_STE_DECAY = 1.0
# Linear layers inside a numbered list of blocks (`h.0.attn.c_attn`, `model.layers.3.mlp.up_proj`):
# the transformer blocks of the built-in GPT and of Hugging Face causal LMs. Embeddings, the head,
# norms and biases are never candidates (only Linear/Conv1D weights are).
DEFAULT_INCLUDE = ["*.[0-9]*"]


@dataclass
class SparsityConfig:
    method: str = "dense"  # dense | nm | rigl | set | static | magnitude | scl

    # --- N:M fine-grained structured sparsity (Zhou et al. 2021) ---
    n: int = 2
    m: int = 4
    # auto: SR-STE without progressive gradient flow, plain STE with MDGF/SDGF (as the reference
    # code of Bambhaniya et al. does); sr_ste | ste force one.
    estimator: str = "auto"
    # decoupled (for Adam-family optimizers, the default): after each optimizer step the pruned
    # fp32 master weights decay, W[~mask] *= 1 - lr_t * sr_ste_decay (like AdamW's weight decay).
    # coupled (the paper's form, meant for SGD): lambda_W * (1 - mask) * W / grad_accum added to
    # the gradient in backward.
    sr_ste_form: str = "decoupled"
    # lambda_d of the decoupled form, per unit of lr (SR_STE_DECAY above: the paper's decay-to-update
    # ratio under Adam; lr * lambda_d must stay < 1); null is the same default.
    sr_ste_decay: float | None = SR_STE_DECAY
    sr_ste_lambda: float = 2e-4  # the paper's lambda_W (coupled form)
    mask_interval: int = 1  # recompute the N:M mask from the dense weights every this many steps
    # N:M in the backward pass (trainer/sparsity/nm_backward.py): exact (autograd through the
    # forward-masked weight) | bidirectional (Bi-Mask: the input gradient through a second N:M
    # mask along the output dim) | transposable (Hubara et al.: one mask N:M along both dims)
    backward: str = "exact"
    backward_permutations: int = 10  # bidirectional: random output-dim permutations tried (Bi-Mask greedy_num)
    backward_permutation_interval: int = 100  # bidirectional: steps between permutation searches (Bi-Mask iter)

    # --- progressive gradient flow (Bambhaniya et al. 2024), N:M only ---
    gradient_flow: str = "none"  # none | mdgf_linear | mdgf_exp | sdgf
    decay_coef: float = 2e-4  # MDGF c: beta(t) = max(0, 1 - c (t - t0)) or exp(-c (t - t0)); ref code default
    dense_fraction: float = 0.0  # fraction of steps trained dense at the start (ref code default 0)
    fine_tune_fraction: float = 0.0  # fraction of steps at the end with the hard N:M mask (beta = 0)
    sdgf_schedule: str = "sparsify"  # sparsify | densify | fine | custom
    sdgf_stages: list[str] = field(default_factory=list)  # custom stages, e.g. ["4:8", "2:8", "1:8"]

    # --- unstructured: dynamic (SET, RigL), static, gradual magnitude pruning ---
    density: float = 0.1  # target fraction of active weights over the sparsified layers
    distribution: str = "auto"  # erk | uniform | auto: uniform for magnitude (Zhu & Gupta), ERK otherwise (RigL)
    update_interval: int = 100  # RigL/SET: Delta_T
    drop_fraction: float = 0.3  # RigL/SET: alpha (zeta in SET)
    drop_schedule: str = "cosine"  # cosine: alpha/2 (1 + cos(pi t / T_end)) (RigL); constant: alpha (SET)
    end_fraction: float = 0.75  # RigL/SET: no mask updates from this fraction of training on
    # RigL/SET/static starting mask: random, magnitude (the largest |w| of the starting weights),
    # auto: magnitude when the job starts from pretrained weights (model=hf or a resumed
    # checkpoint), random otherwise.
    init: str = "auto"
    # RigL/SET/static from scratch: fan_in rescales each output row's kept initial weights by
    # sqrt(fan_in / active fan_in) so activations keep the dense init's scale (RigL's sparse init).
    init_scale: str = "none"
    erk_power_scale: float = 1.0  # ERK raw density (sum(dims) / prod(dims)) ** erk_power_scale (RigL)
    prune_start_fraction: float = 0.0  # magnitude: t0 as a fraction of training
    prune_end_fraction: float = 0.75  # magnitude: t0 + n*dt as a fraction of training
    prune_interval: int = 100  # magnitude: dt
    initial_sparsity: float = 0.0  # magnitude: s_i

    # --- SCL, learned masks (Tang et al. 2022; trainer/sparsity/scl.py) ---
    # uses density (overall target), end_fraction (the target schedule reaches it there) and
    # fine_tune_fraction (masks frozen for that last fraction of training)
    scl_lambda: float | None = None  # the regulariser's coefficient; null: a controller reaches `density`
    scl_controller_gain: float = 10.0  # k: lambda_t = k (density_t - target_{t+1}) while the controller runs
    scl_mask_lr: float = 0.05  # SGD step of the mask variables on the normalised mask gradient
    scl_mask_init: float = 1.0  # starting mask variable (> 0: connected)
    scl_freeze_in_rl: bool = True  # RL (launch.rl): masks frozen from the RL phase on; false: they keep learning
    seed: int = 0  # random masks (SET regrowth, static/RigL init): identical on every rank

    # --- which weights ---
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))  # fnmatch on module names
    exclude: list[str] = field(default_factory=list)
    # per-layer overrides, first matching pattern wins: {"h.0.*": {"n": 4, "m": 8}} or {"h.3.mlp.*": {"density": 0.3}}
    overrides: dict[str, Any] = field(default_factory=dict)


def effective_estimator(cfg: SparsityConfig) -> str:
    """The estimator in force: `auto` is SR-STE without progressive gradient flow, STE with it."""
    if cfg.estimator != "auto":
        return cfg.estimator
    return "sr_ste" if cfg.gradient_flow == "none" else "ste"


def sr_ste_decay(cfg: SparsityConfig) -> float:
    """lambda_d of the decoupled SR-STE form (see SparsityConfig.sr_ste_decay)."""
    return SR_STE_DECAY if cfg.sr_ste_decay is None else float(cfg.sr_ste_decay)


def effective_init(cfg: SparsityConfig, pretrained: bool) -> str:
    """The starting-mask rule in force: `auto` is magnitude from pretrained weights, else random."""
    if cfg.init != "auto":
        return cfg.init
    return "magnitude" if pretrained else "random"


def effective_distribution(cfg: SparsityConfig) -> str:
    if cfg.distribution != "auto":
        return cfg.distribution
    return "uniform" if cfg.method == "magnitude" else "erk"
