"""State checksums: one digest of the names, dtypes, shapes and bit patterns of a state dict.

Publishers (sync/publisher.py, per slice), the driver (sync/transport.py, over every rank's
slices) and receivers (sync/receiver.py, over what they committed) compute it the same way, so
equal checksums mean bit-identical weights in the published dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

from sync.dtypes import bits_of, info_for
from sync.format import digest


def checksum_entry(key: str, dtype_name: str, shape: Sequence[int], xxh: str) -> str:
    """One key's part of a state checksum: its name, dtype, shape and bit-pattern digest."""
    return f"{key}|{dtype_name}|{list(shape)}|{xxh};"


def checksum_entries(state: dict[str, torch.Tensor], digests: dict[str, str] | None = None) -> dict[str, str]:
    """Per tensor (or slice) key: its checksum entry (digests from `digests` where given).
    Ranks compute these for their slices; the union gives the checksum of the whole published
    state."""
    digests = digests or {}
    return {name: checksum_entry(name, info_for(t.dtype, name).name, t.shape, digests.get(name) or digest(bits_of(t)))
            for name, t in state.items()}


def combine_checksums(entries: dict[str, str]) -> str:
    """The checksum of a state from its keys' entries (order-independent: sorted by key)."""
    h = xxhash.xxh3_64()
    for name in sorted(entries):
        h.update(entries[name].encode())
    return h.hexdigest()


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bit patterns of a state dict (order-independent)."""
    return combine_checksums(checksum_entries(state))
