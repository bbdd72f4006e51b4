"""Lossless sparse-delta weight synchronizer.

- encoder.py: encode(old, new) -> buckets; decoder.py: apply(state, version, buckets), checked
  limits first (pure, no Ray); codec.py re-exports both sides' public names
- format.py: bucket and container framing, checksums, limits; dtypes.py: dtype tables and bit views
- slices.py: which trainer rank publishes which elements (the slice plan and its keys)
- publisher.py: one rank's side of a publish (its slice, encoded part by part)
- transport.py: the driver's ShardedPublisher over the Ray object store (+ WeightPublisher, one process)
- payloads.py: what crosses actor boundaries (WeightUpdate, PublishStats, SyncStats); checksum.py: state checksums
- receiver.py: WeightReceiver: pipelined fetch, verify into a shadow, commit
- policy.py: sparse or dense per publish, from measured end-to-end times
- cli.py: `python -m sync encode|apply|inspect` on safetensors files
- FORMAT.md: the wire format (buckets, encodings, DELTA file container)

Names are imported lazily so `from sync.config import SyncConfig` stays cheap (no numba).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "encode": "sync.codec", "apply": "sync.codec", "inspect_payload": "sync.codec",
    "SyncConfig": "sync.config",
    "WeightPublisher": "sync.transport", "ShardedPublisher": "sync.transport", "WeightReceiver": "sync.receiver",
    "WeightUpdate": "sync.payloads", "SyncStats": "sync.payloads", "PublishStats": "sync.payloads",
    "state_checksum": "sync.checksum",
    "SyncError": "sync.errors", "CorruptBucketError": "sync.errors", "VersionMismatchError": "sync.errors",
    "TensorMismatchError": "sync.errors", "NotADeltaError": "sync.errors", "BadInputError": "sync.errors",
    "UpdateUnavailableError": "sync.errors", "LimitError": "sync.errors", "CorruptTargetError": "sync.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sync' has no attribute {name!r}")
