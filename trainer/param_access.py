"""Full fp32 master weights and optimizer state by parameter name, under DeepSpeed.

Sparsity methods read and write master weights (and zero optimizer moments of regrown
positions) through this small protocol, so they never see ZeRO's flat partitions:
`get(name) -> fp32 tensor`, `set(name, value)`, `reset_optimizer_state(name, positions)`.

Under ZeRO 1/2 and the bf16 optimizer the calls are collective (DeepSpeed all-reduces the
fragments): every rank must make the same calls in the same order.
"""
from __future__ import annotations

import torch

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's moments


class DeepSpeedParamAccess:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self._params = dict(module.named_parameters())
        self._optimizer = optimizer  # the torch optimizer DeepSpeed was given (used when no ZeRO/bf16 wrapper)

    def names(self) -> list[str]:
        return list(self._params)

    def _param(self, name: str) -> torch.nn.Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r}; have {sorted(self._params)[:8]}...") from None

    def get(self, name: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        p = self._param(name)
        full = safe_get_full_fp32_param(p)
        # No DeepSpeed master copy (ZeRO 0, fp32): the parameter itself is the master weight.
        return p.detach() if full is None else full

    def set(self, name: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        p = self._param(name)
        value = value.to(device=p.device, dtype=torch.float32).reshape(p.shape) if not hasattr(p, "ds_id") else value
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value)
        if not hasattr(p, "ds_id"):
            # ZeRO 0-2 keep a full working copy on every rank; update it too, or the next forward
            # would use the old value until the optimizer copies masters back.
            with torch.no_grad():
                p.data.copy_(value.to(p.dtype))

    def reset_optimizer_state(self, name: str, positions: torch.Tensor) -> None:
        """Zero the AdamW moments at `positions` (a bool mask of the parameter's shape, or flat indices)."""
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        p = self._param(name)
        for key in OPTIMIZER_STATE_KEYS:
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                state = safe_get_full_optimizer_state(p, key)
                if state is None:
                    continue
                _zero_at(state, positions)
                safe_set_full_optimizer_state(p, state, key)
            else:
                state = self._optimizer.state.get(p, {}).get(key)
                if state is not None:  # no state before the first step: nothing to reset
                    _zero_at(state, positions)


def _zero_at(state: torch.Tensor, positions: torch.Tensor) -> None:
    positions = positions.to(state.device)
    with torch.no_grad():
        if positions.dtype == torch.bool:
            state[positions.reshape(state.shape)] = 0
        else:
            state.view(-1)[positions.reshape(-1)] = 0
