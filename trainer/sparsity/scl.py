"""Sparse Connectivity Learning (SCL; Tang et al., "Automatic Sparse Connectivity Learning for
Neural Networks", TNNLS 34(10), 2022, arXiv 2201.05020). No official code is public; what follows
is derived from the paper, and every choice the paper leaves open is marked (choice).

Every targeted weight is a trainable value times a binary mask, the mask the unit step of a
trainable mask variable m (same shape as the weight):

    W_eff = W * M,    M = H(m) = 1[m > 0]

Forward uses W_eff. Backward, with g = dL/dW_eff:
- dL/dW = g * M (the chain rule through the binary mask: a pruned weight keeps its value and gets
  no gradient; it comes back with that value when its mask turns on again).
- dL/dM = g * W, and dL/dm = dL/dM * H'(m) with the Identity straight-through estimator
  H'(m) := 1 (the paper's choice among the proxies with positive derivative, which it proves is
  what lets mask variables settle at their minima). Every mask variable gets this gradient,
  active or not, so pruned connections can grow back.
- Per-feature normalisation (the paper: mask-gradient scales differ wildly between features):
  for each output unit i (a row of a Linear's [out, in] weight),
      ghat[i, :] = (dL/dm)[i, :] / rms_j (dL/dm)[i, j]
  (choice: the RMS over the unit's fan-in, so every unit's mask gradients have unit scale; a
  unit whose mask gradient is all zero gets zero).
- Connection-count regulariser R = sum over targeted layers of sum(M) (the number of active
  connections), added to the loss with coefficient lambda_t. Through the Identity STE,
  dR/dm = 1 for every mask variable; it is added to the normalised task gradient, in the same
  units (choice: the paper's R counts connections; expressing lambda per normalised unit makes
  one value mean the same on any layer width).
- Update (choice: plain SGD on the mask variables, their own lr, outside the model's optimizer,
  so DeepSpeed, checkpoints of the weights and exports see the same parameters as without SCL):
      m <- m - sparsity.scl_mask_lr * (ghat + lambda_t)
  with dL/dm summed over micro-batches and averaged over data-parallel ranks (an all-reduce), so
  every rank holds the same m and the same masks.
- Start (choice; the paper does not say): m_0 = +sparsity.scl_mask_init everywhere (dense), so
  which connections go is decided by the mask gradients alone, not by a magnitude prior. From
  pretrained weights (model=hf, resume) a weight that is exactly 0 starts pruned
  (-scl_mask_init), so an exported sparse model keeps its zeros.

The coefficient (choice: the paper sets lambda by hand per experiment; a job states a density):
`sparsity.scl_lambda` fixes lambda_t (the raw coefficient; the density is then whatever it learns).
Left null, a proportional controller sets it so the overall density of the targeted layers
follows
    d*(t) = d + (1 - d) (1 - t / T_e)^3  for t < T_e = sparsity.end_fraction * T,  d afterwards
(Zhu & Gupta's cubic schedule), d = sparsity.density:
    lambda_t = k (density_t - d*(t + 1)),   k = sparsity.scl_controller_gain.
The mask variables integrate lambda, so lambda sets the speed at which the density moves: a
proportional law tracks the schedule without overshoot, where a PI variant wound up and
overshot (measured on a 2-layer GPT, target 0.2, mask lr 0.01: density 0.05, and stuck there).
lambda_t may be negative (a reward per connection): early in training the task gradient alone
prunes faster than the schedule (measured: density 0.39 at step 10 against a target of 0.61),
and only a negative coefficient lets the controller hold the density up to the target. Each
layer's density is learned: only the overall count is steered, there is no per-layer budget
(no ERK). The masks stop changing for the last
`sparsity.fine_tune_fraction` of training (weights keep training under the frozen masks), and at
the start of RL when `sparsity.scl_freeze_in_rl` (see `on_rl_start`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainer.sparsity.base import ParamAccess, Sparsifier, check_unstructured
from trainer.sparsity.config import SparsityConfig
from trainer.sparsity.masked_forward import SparseLayer
from trainer.sparsity.partitioned import full_weight

def normalise_per_feature(grad: torch.Tensor, input_dim: int) -> torch.Tensor:
    """grad / (RMS over the input dim), per output feature; 0 where a feature's gradient is all 0."""
    rms = grad.pow(2).mean(dim=input_dim, keepdim=True).sqrt()
    return torch.where(rms > 0, grad / rms.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad))


def cubic_target(step: int, density: float, end_step: int) -> float:
    """d*(t) = d + (1 - d) (1 - t / T_e)^3 before T_e, d from T_e on."""
    if step >= end_step:
        return density
    return density + (1.0 - density) * (1.0 - step / end_step) ** 3


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class SCLSparsifier(Sparsifier):
    """method = scl (see the module docstring for the formulas)."""

    method = "scl"

    def __init__(self, model, cfg: SparsityConfig, total_steps: int, layers: list[SparseLayer],
                 pretrained: bool = False):
        super().__init__(model, cfg, total_steps, layers)
        self.pretrained = pretrained
        self.end_step = max(1, int(cfg.end_fraction * total_steps))
        self.freeze_step = total_steps - int(cfg.fine_tune_fraction * total_steps)
        self.scores: dict[str, torch.Tensor] = {}  # the mask variables m, fp32, on the module's device
        self.controlled = cfg.scl_lambda is None
        self.coefficient = 0.0 if cfg.scl_lambda is None else float(cfg.scl_lambda)
        self.target = 1.0
        self.frozen_for_rl = False
        for layer in self.layers.values():
            layer.mask_gradient = True  # dL/dW = g * M

    def learning(self, step: int) -> bool:
        """Whether the mask variables train at `step` (not in the fine-tune tail, not frozen for RL)."""
        return not self.frozen_for_rl and step < self.freeze_step

    def on_rl_start(self) -> None:
        """The RL phase begins: freeze the masks when sparsity.scl_freeze_in_rl."""
        if self.cfg.scl_freeze_in_rl:
            self.frozen_for_rl = True
            for layer in self.layers.values():
                layer.capture_mask_grad = False
                layer.mask_grad = None

    def attach(self) -> None:
        for layer in self.layers.values():
            if layer.name not in self.scores:
                weight = full_weight(layer)
                init = torch.full(layer.shape, float(self.cfg.scl_mask_init), dtype=torch.float32,
                                  device=weight.device)
                if self.pretrained:  # an exported sparse model keeps its zeros pruned
                    init = torch.where(weight != 0, init, -init)
                self.scores[layer.name] = init
                layer.record_mask(init > 0)
        super().attach()

    def before_forward(self, step: int) -> None:
        if step == self.step:
            return
        self.step = step
        capture = self.learning(step)
        for layer in self.layers.values():
            layer.capture_mask_grad = capture
            layer.mask_grad = None

    def density(self) -> float:
        total = sum(layer.numel for layer in self.layers.values())
        active = sum(int(layer.current_mask().sum()) for layer in self.layers.values())
        return active / total if total else 1.0

    def after_optimizer_step(self, step: int, params: ParamAccess) -> None:
        if not self.learning(step):
            return
        self.target = cubic_target(step + 1, self.cfg.density, self.end_step)
        if self.controlled:
            self.coefficient = float(self.cfg.scl_controller_gain) * (self.density() - self.target)
        lr = float(self.cfg.scl_mask_lr)
        for layer in self.layers.values():
            if layer.mask_grad is None:
                raise RuntimeError(
                    f"SCL step {step} found no mask gradient for {layer.name}: call before_forward(step) "
                    f"before the forward/backward of every step"
                )
            score = self.scores[layer.name]
            # summed over micro-batches, averaged over ranks; its scale does not matter: the
            # per-feature normalisation divides it out
            grad = _all_reduce_mean(layer.mask_grad.to(score.device))
            score.sub_(lr * (normalise_per_feature(grad, layer.input_dim) + self.coefficient))
            layer.mask_grad = None
            layer.record_mask((score > 0).to(layer.weight.device))

    def pattern(self, layer: SparseLayer) -> dict[str, Any]:
        return {"kind": "unstructured", "density": int(layer.current_mask().sum()) / layer.numel}

    def _check_layer(self, layer: SparseLayer, value: torch.Tensor) -> None:
        check_unstructured(layer, value, int(layer.current_mask().sum()))

    def describe(self) -> dict[str, Any]:
        return {"scl_lambda": self.coefficient, "controller": self.controlled,
                "target_density": self.cfg.density, "frozen_for_rl": self.frozen_for_rl}

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out["sparsity/scl_lambda"] = float(self.coefficient)
        out["sparsity/target_density"] = float(self.target)
        out["sparsity/masks_learning"] = 1.0 if self.step is not None and self.learning(self.step) else 0.0
        return out

    def _family_state(self) -> dict:
        return {"scores": {name: s.detach().cpu().clone() for name, s in self.scores.items()},
                "coefficient": self.coefficient, "target": self.target,
                "frozen_for_rl": self.frozen_for_rl}

    def _load_family_state(self, state: dict) -> None:
        for name, layer in self.layers.items():
            self.scores[name] = state["scores"][name].to(layer.weight.device, torch.float32)
        self.coefficient = state["coefficient"]
        self.target = state["target"]
        self.frozen_for_rl = state["frozen_for_rl"]
        for layer in self.layers.values():
            layer.mask_gradient = True
