"""Typed errors of the weight synchronizer. Every bad payload raises a `SyncError` subclass whose
message names what is wrong, so callers can catch one type and keep their weights untouched."""
from __future__ import annotations


class SyncError(Exception):
    """Base class: a payload, file or state that the synchronizer cannot use."""


class CorruptBucketError(SyncError):
    """A bucket failed a check: magic, format version, length, checksum, order, or its decoded
    result does not match the checksum the sender computed."""


class VersionMismatchError(SyncError):
    """The receiver's version is not the delta's base version."""


class TensorMismatchError(SyncError):
    """A tensor's name, shape, dtype or base content does not match the receiver's state."""


class NotADeltaError(SyncError):
    """The bytes or file are not a sync payload at all (wrong magic, not a container)."""


class BadInputError(SyncError):
    """An input state file (e.g. a safetensors checkpoint) cannot be read."""


class UpdateUnavailableError(SyncError):
    """Part of an update could not be fetched: the trainer rank that encodes it failed or died,
    its object was lost, or it did not arrive within sync.fetch_timeout_s (a stalled link)."""


class CorruptTargetError(SyncError):
    """A receiver's committed weights are not the bits it committed (something other than the
    receiver wrote its target): found when an update's result, built on those bits, fails the
    sender's checksum while the update itself is intact. The receiver then drops its version,
    so only a snapshot applies to it until one restores its weights."""


class LimitError(SyncError):
    """A payload declares more than a reader allows (header size, element count, output bytes):
    refused before anything of that size is allocated or decompressed. The message names the
    field and the limit, and how to raise it where it is configurable."""
