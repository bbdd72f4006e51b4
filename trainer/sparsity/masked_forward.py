"""The masked forward: a custom autograd Function applied to a weight inside the module's forward.

The module keeps its class, its parameters and their names (no torch parametrize renaming), so
state_dict, DeepSpeed and the optimizer see the same parameters as without sparsity. All
gradient changes (STE, SR-STE, masking, RigL's dense-gradient capture) happen inside the
autograd backward, so gradient hooks that fire during backward (DeepSpeed ZeRO 1/2 reduction)
see the final gradient.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sparsity_targets import projection_weight
from trainer.sparsity.layers import ModuleKind


@dataclass(eq=False)
class SparseLayer:
    """One sparsified weight: what the forward/backward of its module does, and its mask history."""

    name: str  # parameter name, as in model.named_parameters() / state_dict
    module_name: str
    module: nn.Module
    kind: ModuleKind
    shape: tuple[int, ...]  # weight shape as stored
    mask: torch.Tensor | None = None  # bool, shape as stored; None: the forward is dense
    beta: float = 0.0  # forward uses W * (mask + (1 - mask) * beta) while training (MDGF)
    mask_gradient: bool = False  # DST/pruning: inactive weights get no gradient
    sr_ste_lambda: float = 0.0  # SR-STE: adds lambda * (1 - mask) * W to the gradient
    capture_dense_grad: bool = False  # RigL update step: keep dL/d(W_eff) of the whole matrix
    dense_grad: torch.Tensor | None = None
    capture_mask_grad: bool = False  # SCL: keep dL/dM = dL/d(W_eff) * W, summed over micro-batches
    mask_grad: torch.Tensor | None = None
    # bool, shape as stored: N:M in backward (bidirectional) runs the input gradient through
    # W * backward_mask instead of W * mask; None: plain autograd (exact, transposable)
    backward_mask: torch.Tensor | None = None
    # mask history, for SAD and the ever-flipped fraction
    initial_mask: torch.Tensor | None = None
    ever_flipped: torch.Tensor | None = None
    sad_last: torch.Tensor | None = None  # flips at the latest mask update
    sad_total: torch.Tensor | None = None  # flips summed over all updates
    extra: dict = field(default_factory=dict)  # family-specific per-layer values (n, m, density)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def input_dim(self) -> int:
        return self.kind.input_dim

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight: the parameter this layer sparsifies."""
        return projection_weight(self.module)

    def current_mask(self) -> torch.Tensor:
        """The mask in force; RuntimeError when none is (the sparsifier's attach() installs one)."""
        if self.mask is None:
            raise RuntimeError(f"sparse layer {self.name} has no mask: the sparsifier has not attached it")
        return self.mask

    def flip_history(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ever_flipped, sad_last, sad_total), set together by the first `record_mask`."""
        if self.ever_flipped is None or self.sad_last is None or self.sad_total is None:
            raise RuntimeError(f"sparse layer {self.name} has no mask history: no mask was recorded")
        return self.ever_flipped, self.sad_last, self.sad_total

    def record_mask(self, new_mask: torch.Tensor) -> None:
        """Install a new mask and update SAD / ever-flipped (device tensors: no host sync)."""
        if self.initial_mask is None:
            self.initial_mask = new_mask.clone()
            self.ever_flipped = torch.zeros_like(new_mask)
            self.sad_last = torch.zeros((), dtype=torch.long, device=new_mask.device)
            self.sad_total = torch.zeros((), dtype=torch.long, device=new_mask.device)
        elif self.mask is not None:
            ever_flipped, _, sad_total = self.flip_history()
            flipped = new_mask ^ self.mask
            self.sad_last = flipped.sum()
            self.sad_total = sad_total + self.sad_last
            ever_flipped |= flipped
        self.mask = new_mask

    def add_dense_grad(self, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        self.dense_grad = g.clone() if self.dense_grad is None else self.dense_grad.add_(g)

    def add_mask_grad(self, grad: torch.Tensor, weight: torch.Tensor) -> None:
        g = grad.detach().float() * weight.detach().float()
        self.mask_grad = g if self.mask_grad is None else self.mask_grad.add_(g)


class MaskedWeight(torch.autograd.Function):
    """forward: W * mask, or W * (mask + (1 - mask) * beta); backward: see SparseLayer flags."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, layer: SparseLayer, beta: float):
        ctx.layer = layer
        ctx.mask_gradient = layer.mask_gradient
        ctx.sr_ste_lambda = layer.sr_ste_lambda
        ctx.capture_mask_grad = layer.capture_mask_grad
        ctx.save_for_backward(weight if layer.sr_ste_lambda or layer.capture_mask_grad else None, mask)
        if beta:
            return torch.where(mask, weight, weight * beta)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        layer: SparseLayer = ctx.layer
        if layer.capture_dense_grad:
            layer.add_dense_grad(grad)
        if ctx.capture_mask_grad:  # W_eff = W * M, so dL/dM = dL/dW_eff * W (before any masking)
            layer.add_mask_grad(grad, weight)
        if ctx.mask_gradient:
            grad = grad * mask
        # STE: the gradient of the sparse weights goes straight to all of W (no multiply by mask).
        if ctx.sr_ste_lambda:  # coupled SR-STE, summed in fp32 (in bf16 the small term would round away)
            grad = torch.where(mask, grad, (grad.float() + ctx.sr_ste_lambda * weight.float()).to(grad.dtype))
        return grad, None, None, None


class InputGradMasked(torch.autograd.Function):
    """y = x W_f^T + b (Linear, input_dim 1) or x W_f + b (Conv1D, input_dim 0), where W_f is the
    forward-masked weight (from MaskedWeight, whose backward applies STE/SR-STE to dL/dW_f).
    Backward: dL/dx through `backward_weight` (W . M_b), dL/dW_f = g^T x dense, dL/db = sum g."""

    @staticmethod
    def forward(ctx, x, forward_weight, bias, backward_weight, input_dim: int):
        ctx.input_dim = input_dim
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, backward_weight)
        if input_dim == 1:
            return F.linear(x, forward_weight, bias)
        out = x @ forward_weight
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad):
        x, backward_weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = backward_weight if ctx.input_dim == 1 else backward_weight.t()  # [out, in]
            grad_x = (g2 @ w.to(g2.dtype)).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x2 if ctx.input_dim == 1 else x2.t() @ g2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def _masked_module_forward(module: nn.Module, layer: SparseLayer, x: torch.Tensor) -> torch.Tensor:
    weight = layer.weight
    if layer.mask is not None:
        if layer.mask.device != weight.device:  # the model moved after attach
            layer.mask = layer.mask.to(weight.device)
        beta = layer.beta if module.training else 0.0  # eval sees the hard mask, as published
        weight = MaskedWeight.apply(weight, layer.mask, layer, beta)
        if layer.backward_mask is not None and torch.is_grad_enabled():
            # bidirectional N:M: the input gradient runs through W . M_b, not through W . M_f
            backward_weight = layer.weight.detach() * layer.backward_mask.to(weight.device)
            return InputGradMasked.apply(x, weight, module.bias, backward_weight, layer.input_dim)
    return layer.kind.forward(module, x, weight)


def patch_forward(layer: SparseLayer) -> None:
    # An instance attribute shadows the class's forward; parameters and their names are untouched.
    layer.module.forward = functools.partial(_masked_module_forward, layer.module, layer)


def unpatch_forward(layer: SparseLayer) -> None:
    layer.module.__dict__.pop("forward", None)
