"""The typed values that cross actor boundaries in a weight sync.

- WeightUpdate (with its Parts): the driver -> receivers; a small picklable handle whose parts are
  ObjectRefs to bucket lists in the trainer ranks' object stores (sync/transport.py makes them).
- PublishStats: the driver's publisher -> the driver, one per publish (sync/transport.py).
- SyncStats: a receiver's commit -> its caller (sync/receiver.py WeightReceiver.commit); a rollout
  worker fills in the fields it measures itself (rollout/weight_slot.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Part:
    """One independent payload: the slice keys it covers and an ObjectRef to its bucket list."""

    keys: list[str] | None  # None: every tensor the payload holds (a whole-state payload)
    ref: Any


@dataclass
class WeightUpdate:
    """`steps` are applied in order (one for a delta or a snapshot, several for a chain); each
    step is the parts of every trainer rank for one version."""

    kind: str  # "none" | "delta" | "chain" | "snapshot"
    base_version: int | None
    target_version: int | None
    payload_bytes: int  # known sizes only (a version still encoding counts 0)
    steps: list[list[Part]] = field(default_factory=list)
    fetch_timeout_s: float | None = None  # sync.fetch_timeout_s: a receiver's wait for one part
    fetch_attempts: int | None = None  # sync.fetch_attempts: such waits before giving up


@dataclass
class PublishStats:
    version: int
    kind: str  # "delta" | "snapshot" (dense or first)
    dense: bool
    payload_bytes: int
    dense_bytes: int
    ratio: float
    changed: int  # elements whose bits changed (0 for snapshots)
    encode_s: float  # the slowest rank's encode time
    parts: int
    checksum: str
    density: float  # nonzero fraction of the published weights


@dataclass
class SyncStats:
    """One committed update on one receiver: what it moved and cost, and the checksum of the state
    it left (from the digests verified at commit; compare with PublishStats.checksum)."""

    version: int | None
    kind: str  # the update's kind ("none" | "delta" | "chain" | "snapshot")
    payload_bytes: int
    transfer_s: float  # waiting for parts to arrive
    decode_s: float  # decoding and verifying into the shadow
    apply_s: float  # writing the verified changes into the target
    staged_bytes: int
    checksum: str
    # filled in by a rollout worker (rollout/weight_slot.py) where they apply:
    engine_load_s: float = 0.0  # the engine taking the changed tensors
    shared: bool = False  # committed from a staging another worker on the node fetched and decoded
    sync_s: float | None = None  # sync mode: the whole update, fetch to commit
    fetch_s: float | None = None  # async mode: the background fetch
    pause_s: float | None = None  # async mode: the swap generation waited for
    weights_wait_s: float | None = None  # async mode: waiting for an update still downloading
