"""Full fp32 master weights and optimizer state by parameter name, under DeepSpeed.

Sparsity methods read and write master weights (and zero optimizer moments of regrown
positions) through this small protocol, so they never see ZeRO's flat partitions:
`get(name) -> fp32 tensor`, `set(name, value)`, `reset_optimizer_state(name, positions)`.
`local_partition(name)` is the other direction: the slice of the fp32 master this rank owns,
for work that each rank does on its own share; `published_slice` is that share of every
parameter as the sharded publish (sync/slices.py) takes it.

Under ZeRO 1/2, ZeRO-3 and the bf16 optimizer `get` is collective (DeepSpeed gathers the
fragments): every rank must make the same calls in the same order. `set`,
`reset_optimizer_state` and `local_partition` only touch this rank's memory, but `set` needs
the same full value on every rank, as the sparsity methods compute it.

ZeRO-3 layout (deepspeed/runtime/zero/partition_parameters.py `_partition_param`): a
parameter of `numel` elements is flattened row-major and padded with zeros to a multiple of the
partition world size W; partition r holds flat elements [r * P, (r + 1) * P), P = ceil(numel / W),
in `p.ds_tensor` (working dtype) and in the optimizer's fp32 master partition. The last
partitions may hold padding only past `numel`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeGuard

import torch

from sync.slices import slice_key, slice_range

if TYPE_CHECKING:
    # For the type checker only: the attributes DeepSpeed's ZeRO-3 adds to what it partitions.
    class Zero3Partition(torch.Tensor):
        ds_numel: int  # P, the partition's element count (padding included)

    class Zero3Parameter(torch.nn.Parameter):
        ds_id: int
        ds_numel: int  # the full parameter's element count
        ds_shape: torch.Size  # the full parameter's shape
        ds_tensor: Zero3Partition  # this rank's partition, in the working dtype

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's moments


class LocalPartition(NamedTuple):
    """Flat elements [start, end) of a parameter (row-major, as `get(name).reshape(-1)`) and this
    rank's fp32 master copy of them, a 1-D tensor of end - start elements (empty when the rank
    owns none). `fp32` is a view of the live masters: read it, do not write it (use `set`)."""

    start: int
    end: int
    fp32: torch.Tensor

    def masked(self, mask: torch.Tensor | None) -> torch.Tensor:
        """`fp32` times the matching slice of `mask` (a bool tensor of the parameter's shape, e.g.
        a sparsifier layer's `mask`; None: dense): this rank's share of the published weight, pruned
        entries exactly 0. A new tensor."""
        if mask is None:
            return self.fp32.clone()
        return self.fp32 * mask.reshape(-1)[self.start:self.end].to(self.fp32.device)


@dataclass
class PublishedSlice:
    """A rank's share of the published weights (DeepSpeedParamAccess.published_slice): views of
    its tensors by slice key, and for the sparsified ones the bool masks of the same elements."""

    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]

    def masked(self) -> dict[str, torch.Tensor]:
        """tensor * mask per key (copies of the masked ones: tests and tools, not publishing)."""
        return {k: t * self.masks[k].reshape(t.shape).to(t.device, t.dtype) if k in self.masks else t
                for k, t in self.tensors.items()}


def partition_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """ZeRO-3's partition of `numel` elements for `rank`: [r * P, (r + 1) * P) with
    P = ceil(numel / world_size), clipped to `numel` (the padding is not part of the parameter)."""
    size = -(-numel // world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def is_zero3(p: torch.Tensor) -> TypeGuard[Zero3Parameter]:
    """True for a parameter ZeRO-3 has partitioned (it carries DeepSpeed's `ds_*` attributes)."""
    return hasattr(p, "ds_id")


def _zero3_partition(p: Zero3Parameter) -> tuple[int, int, int]:
    """(start, end, P) of this rank's ZeRO-3 partition of `p` (P counts padding)."""
    import torch.distributed as dist

    size = int(p.ds_tensor.ds_numel)
    group = getattr(p, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    start = min(rank * size, int(p.ds_numel))
    return start, min(start + size, int(p.ds_numel)), size


def _local_slice(flat: torch.Tensor, start: int, end: int, size: int) -> torch.Tensor:
    """flat[start:end] padded with zeros (False) to `size` elements: one ZeRO-3 partition."""
    part = flat[start:end]
    if part.numel() == size:
        return part
    out = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    out[: part.numel()] = part
    return out


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
        if full is None and is_zero3(p):  # a frozen ZeRO-3 parameter has no master: gather the weight
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters

            with GatheredParameters([p]):
                return p.detach().float().clone()
        # No DeepSpeed master copy (ZeRO 0, fp32): the parameter itself is the master weight.
        return p.detach() if full is None else full

    def set(self, name: str, value: torch.Tensor) -> None:
        p = self._param(name)
        if is_zero3(p):
            self._set_zero3(p, value)
            return
        from deepspeed.utils import safe_set_full_fp32_param

        value = value.to(device=p.device, dtype=torch.float32).reshape(p.shape)
        if hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value)
        # ZeRO 0-2 keep a full working copy on every rank; update it too, or the next forward
        # would use the old value until the optimizer copies masters back.
        with torch.no_grad():
            p.data.copy_(value.to(p.dtype))

    @staticmethod
    def _set_zero3(p: Zero3Parameter, value: torch.Tensor) -> None:
        # Each rank writes its own partition from the full value (no communication).
        # deepspeed.utils.safe_set_full_fp32_param does the same but reads past the end of the
        # value on the last rank when the parameter is padded, and leaves the working copy stale.
        from deepspeed.utils import safe_set_local_fp32_param

        if value.numel() != p.ds_numel:
            raise ValueError(f"set: value has {value.numel()} elements, the parameter {tuple(p.ds_shape)} has {p.ds_numel}")
        start, end, size = _zero3_partition(p)
        flat = value.detach().reshape(-1).to(device=p.ds_tensor.device, dtype=torch.float32)
        local = _local_slice(flat, start, end, size)
        safe_set_local_fp32_param(p, local)
        with torch.no_grad():
            p.ds_tensor.data.copy_(local.to(p.ds_tensor.dtype))  # the working partition the next gather reads
            if p.data.numel() == p.ds_numel:  # gathered right now (a persistent small parameter)
                p.data.copy_(flat.reshape(p.data.shape).to(p.dtype))

    def reset_optimizer_state(self, name: str, positions: torch.Tensor) -> None:
        """Zero the AdamW moments at `positions` (a bool mask of the parameter's shape, or flat indices)."""
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        p = self._param(name)
        if is_zero3(p):
            self._reset_zero3(p, positions)
            return
        for key in OPTIMIZER_STATE_KEYS:
            if hasattr(p, "_hp_mapping"):
                state = safe_get_full_optimizer_state(p, key)
                if state is None:
                    continue
                _zero_at(state, positions)
                safe_set_full_optimizer_state(p, state, key)
            else:
                state = self._optimizer.state.get(p, {}).get(key)
                if state is not None:  # no state before the first step: nothing to reset
                    _zero_at(state, positions)

    @staticmethod
    def _reset_zero3(p: Zero3Parameter, positions: torch.Tensor) -> None:
        # The moments are partitioned like the master: each rank zeroes its own slice of them.
        from deepspeed.utils import safe_get_local_optimizer_state, safe_set_local_optimizer_state

        start, end, size = _zero3_partition(p)
        positions = positions.to(p.ds_tensor.device)
        if positions.dtype != torch.bool:
            flat_mask = torch.zeros(p.ds_numel, dtype=torch.bool, device=positions.device)
            flat_mask[positions.reshape(-1)] = True
        else:
            flat_mask = positions.reshape(-1)
        local = _local_slice(flat_mask, start, end, size)
        for key in OPTIMIZER_STATE_KEYS:
            try:
                state = safe_get_local_optimizer_state(p, key)
            except KeyError:  # the optimizer has no such state yet
                continue
            if state is None:
                continue
            state = state.clone()
            state[local.to(state.device)] = 0
            safe_set_local_optimizer_state(p, state, key)

    def published_slice(self, masks: Mapping[str, torch.Tensor | None], rank: int, world_size: int) -> PublishedSlice:
        """Rank `rank`'s share of the published weights (sync/slices.py): the flat element range
        [rank * ceil(n / W), ...) of every parameter, keyed `name[start:stop]` (the plain name
        when one rank owns all of it), with the ranges of `masks` (parameter name -> the
        sparsifier's mask; absent or None: dense) beside them (what is published is tensor *
        mask: sync/publisher.py applies the mask while converting to the published dtype).
        Local, no collective, no copy at all (views): under ZeRO-3 the rank's own partition;
        under ZeRO 0-2 cut from the rank's full working copy, whose values are the masters
        rounded to the working dtype, which is what publishing them in bf16 gives anyway."""
        out: dict[str, torch.Tensor] = {}
        out_masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in self._params.items():
                flat: torch.Tensor
                if is_zero3(p):  # this rank's own partition of the fp32 masters
                    numel, shape = p.ds_numel, tuple(p.ds_shape)
                    start, stop, flat = self.local_partition(name)
                    assert (start, stop) == slice_range(numel, rank, world_size) or start == stop
                else:
                    numel, shape = p.numel(), tuple(p.shape)
                    start, stop = slice_range(numel, rank, world_size)
                    flat = p.detach().reshape(-1)[start:stop]
                if numel == 0:
                    if rank == 0:
                        out[name] = p.detach()
                    continue
                if start == stop:
                    continue
                key = slice_key(name, start, stop, numel)
                out[key] = flat.reshape(shape) if key == name else flat
                mask = masks.get(name)
                if mask is not None:
                    part = mask.reshape(-1)[start:stop]
                    out_masks[key] = part if part.dtype == torch.bool else part != 0
        return PublishedSlice(out, out_masks)

    def local_partition(self, name: str) -> LocalPartition:
        """This rank's share of `name`'s fp32 master, without communication.

        ZeRO-3: the rank's own partition (see the module docstring), padding cut off. ZeRO 1/2 and
        the bf16 optimizer: the fragment of the parameter inside this rank's flat master partition
        (contiguous, maybe empty; fragments of all ranks tile the parameter). ZeRO 0 in fp32 (every
        rank holds the whole master): the ZeRO-3 split, so ranks still own disjoint, balanced slices.
        The matching slice of a mask (or of any full tensor of the parameter's shape) is
        `mask.reshape(-1)[start:end]`."""
        p = self._param(name)
        if is_zero3(p):
            from deepspeed.utils import safe_get_local_fp32_param

            start, end, _ = _zero3_partition(p)
            local = safe_get_local_fp32_param(p)  # None for a frozen parameter: no master, the working copy is it
            local = p.ds_tensor.float() if local is None else local
            return LocalPartition(start, end, local.detach().reshape(-1)[: end - start])
        if hasattr(p, "_hp_mapping"):
            fragment = p._hp_mapping
            if fragment is None:  # none of this parameter falls in this rank's partition
                return LocalPartition(0, 0, torch.empty(0, dtype=torch.float32, device=p.device))
            start = int(fragment.lp_fragment_address.start)
            return LocalPartition(start, start + int(fragment.lp_fragment_address.numel), fragment.hp_fragment.detach())
        import torch.distributed as dist

        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        start, end = partition_range(p.numel(), world, rank)
        return LocalPartition(start, end, p.detach().reshape(-1)[start:end].float())


def _zero_at(state: torch.Tensor, positions: torch.Tensor) -> None:
    positions = positions.to(state.device)
    with torch.no_grad():
        if positions.dtype == torch.bool:
            state[positions.reshape(state.shape)] = 0
        else:
            state.view(-1)[positions.reshape(-1)] = 0
