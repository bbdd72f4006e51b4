"""Which trainer rank publishes which elements: the slice plan shared by publishers and receivers.

Rank r of W owns the flat element range [r * ceil(n / W), min(n, (r + 1) * ceil(n / W))) of every
published tensor of n elements. That is exactly how DeepSpeed ZeRO-3 partitions a parameter, so
under ZeRO-3 a rank publishes its own partition; under ZeRO 0-2 it cuts the same range out of its
full local copy. Every rank gets ~1/W of every tensor: the slices are balanced by construction.

A slice travels under its own key, `name[start:stop]` (1-D), or under the plain name with the
tensor's shape when one rank owns the whole tensor (a single trainer rank). Receivers map keys
back onto views of their full tensors, so applying a slice writes straight into the weights.
"""
from __future__ import annotations

import re

import torch

from sync.errors import TensorMismatchError

_KEY = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def slice_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The flat element range rank `rank` owns of a tensor with `numel` elements (may be empty)."""
    per = -(-numel // world_size)
    start = min(numel, rank * per)
    return start, min(numel, start + per)


def slice_key(name: str, start: int, stop: int, numel: int) -> str:
    return name if (start, stop) == (0, numel) else f"{name}[{start}:{stop}]"


def parse_key(key: str) -> tuple[str, int | None, int | None]:
    """(tensor name, start, stop); start and stop are None for a whole tensor."""
    m = _KEY.match(key)
    if m is None:
        return key, None, None
    return m["name"], int(m["start"]), int(m["stop"])


def take_slice(name: str, tensor: torch.Tensor, rank: int, world_size: int) -> tuple[str, torch.Tensor] | None:
    """This rank's slice of a full tensor as (key, view): the tensor itself when the rank owns all
    of it, a 1-D view of its range otherwise, None when the range is empty."""
    n = tensor.numel()
    if n == 0:  # an empty tensor still travels once, with rank 0
        return (name, tensor) if rank == 0 else None
    start, stop = slice_range(n, rank, world_size)
    if start == stop:
        return None
    if (start, stop) == (0, n):
        return name, tensor
    return slice_key(name, start, stop, n), tensor.reshape(-1)[start:stop]


def target_views(target: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """Views of `target`'s tensors under the published keys. The keys must cover every target
    tensor exactly once (disjoint slices that tile it); otherwise TensorMismatchError."""
    views: dict[str, torch.Tensor] = {}
    covered: dict[str, list[tuple[int, int]]] = {}
    for key in keys:
        name, first, end = parse_key(key)
        if name not in target:
            raise TensorMismatchError(f"update has slice {key!r} of tensor {name!r}, which the receiver does not have")
        t = target[name]
        if first is None or end is None:
            start, stop, view = 0, t.numel(), t
        else:
            start, stop = first, end
            if not (0 <= start < stop <= t.numel()):
                raise TensorMismatchError(f"update's slice {key!r} is outside tensor {name!r} of {t.numel()} elements")
            if not t.is_contiguous():
                raise TensorMismatchError(f"tensor {name!r} is not contiguous: a slice cannot be applied in place")
            view = t.view(-1)[start:stop]
        covered.setdefault(name, []).append((start, stop))
        views[key] = view
    for name, t in target.items():
        ranges = sorted(covered.get(name, []))
        at = 0
        for start, stop in ranges:
            if start != at:
                break
            at = stop
        if at != t.numel() or len(ranges) == 0 and t.numel():
            raise TensorMismatchError(f"update's slices of tensor {name!r} {ranges} do not tile its {t.numel()} elements")
    return views
