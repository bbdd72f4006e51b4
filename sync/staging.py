"""Staging: decode a payload against a base that is only read, into verified changes.

The receiver's side of all-or-nothing without a second copy of the weights. A payload is
checked (decoder.plan_payload), then decoded entry by entry against the receiver's committed
bits, which are never written: each entry's result is rebuilt in per-thread scratch (a delta
entry's block by block, in a cache-sized block), checked against the sender's checksum of that
range, and only what changes is kept:

    KeyChange.pos / .vals   the positions whose bits change and their new bits (a delta), or
    KeyChange.whole         the new bits of the whole key (a snapshot, a tensor sent whole)

so a delta stages memory in proportion to its changes, not to the model. The entries of a key
tile it, so verifying every range verifies the key's result; its digest (the manifest's) is
what the receiver caches for the next delta's base check. Steps of a chain decode against the
committed bits with the earlier steps' changes laid over them (`Base.staged`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import xxhash

from sync import delta_kernels as K
from sync.decoder import PayloadPlan, decode_delta_chunk, decode_dense_chunk, decode_mask_chunk, plan_payload
from sync.dtypes import DtypeInfo
from sync.errors import CorruptBucketError, LimitError, SyncError, TensorMismatchError, VersionMismatchError
from sync.format import DENSE_ENCODINGS, digest
from sync.workspace import PARALLEL_MIN_ELEMS, scratch, workers

VERIFY_BLOCK_BYTES = 256 << 10  # stays in L2 while it is patched and hashed


@dataclass
class KeyChange:
    """What one step does to one published key (a tensor, or a rank's slice of one)."""

    info: DtypeInfo
    shape: tuple
    xxh: str  # digest of the key's bits after the step (the sender's, verified range by range)
    whole: np.ndarray | None = None  # new bits of the whole key (flat), or
    pos: np.ndarray | None = None  # sorted flat positions whose bits change (int64)
    vals: np.ndarray | None = None  # ... and their new bits

    @property
    def changed(self) -> int:
        return 0 if self.pos is None else int(self.pos.shape[0])

    def nbytes(self) -> int:
        if self.whole is not None:
            return self.whole.nbytes
        return 0 if self.pos is None or self.vals is None else self.pos.nbytes + self.vals.nbytes


@dataclass
class Base:
    """What a payload decodes against: the committed keys (their dtype and shape, a reader of
    their bits, their digests where known) and the changes earlier steps of the same update
    staged over them."""

    meta: dict  # key -> (DtypeInfo, shape)
    read: Callable[[str, int, int], np.ndarray]  # committed bits [start, stop) of a key, read-only
    digests: dict  # key -> digest of the committed bits (missing: computed on demand)
    staged: dict = field(default_factory=dict)  # key -> KeyChange of an earlier step

    def bits(self, key: str, start: int, stop: int) -> np.ndarray:
        """Bits [start, stop) of `key` as the previous step left them (read-only, or a copy)."""
        ch = self.staged.get(key)
        if ch is None:
            return self.read(key, start, stop)
        if ch.whole is not None:
            return ch.whole[start:stop]
        out = np.array(self.read(key, start, stop))
        lo, hi = np.searchsorted(ch.pos, (start, stop))
        out[ch.pos[lo:hi] - start] = ch.vals[lo:hi]
        return out

    def digest(self, key: str) -> str:
        ch = self.staged.get(key)
        if ch is not None:
            return ch.xxh
        if self.digests.get(key) is None:
            n = int(np.prod(self.meta[key][1], dtype=np.int64))
            self.digests[key] = digest(self.read(key, 0, n))
        return self.digests[key]


@dataclass
class StagedPayload:
    base_version: int | None
    target_version: int
    order: list  # the payload's keys, in manifest order
    changes: dict  # key -> KeyChange (every key of the payload)
    payload_bytes: int

    @property
    def changed(self) -> int:
        return sum(c.changed for c in self.changes.values())


def stage_payload(buckets, version: int | None, base: Base, keys: list | None = None,
                  max_bytes: int | None = None) -> StagedPayload:
    """Check and decode a payload against `base` (restricted to `keys` when given: the part of
    the state this payload covers). Nothing of `base` is written. Raises SyncError subclasses."""
    parsed, plan = plan_payload(buckets, max_bytes)
    try:
        return _stage_checked(parsed, plan, version, base, keys)
    except SyncError:
        raise
    except MemoryError:
        raise LimitError(f"out of memory staging a payload that creates {plan.new_bytes} bytes of tensors") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise CorruptBucketError(f"malformed payload: {type(e).__name__}: {e}") from None


def _stage_checked(parsed, plan: PayloadPlan, version, base: Base, keys) -> StagedPayload:
    if plan.base is not None:
        if not isinstance(version, int) or isinstance(version, bool) or version != plan.base:
            raise VersionMismatchError(f"payload is a delta {plan.base} -> {plan.target}; it needs a receiver at "
                                       f"version {plan.base}, this one is at {version!r}")
        _check_base(plan, base, keys)
    changes = {name: KeyChange(t.info, t.shape, t.xxh) for name, t in plan.tensors.items()}
    for name, t in plan.tensors.items():
        if t.kind == "whole":
            changes[name].whole = np.empty(t.numel, t.info.uint)
    found: dict[str, list] = {name: [] for name in plan.tensors}
    pool = ThreadPoolExecutor(workers()) if workers() > 1 else None
    try:
        for b, entries in zip(parsed, plan.entries):
            work = [lambda e=e: _stage_entry(b.body, e, plan.tensors[e.name], changes[e.name], base) for e in entries]
            total = sum(e.stop - e.start for e in entries)
            if pool is not None and len(work) > 1 and total >= PARALLEL_MIN_ELEMS:
                results = list(pool.map(lambda f: f(), work))
            else:
                results = [f() for f in work]
            for e, r in zip(entries, results):
                if r is not None:
                    found[e.name].append(r)
    finally:
        if pool is not None:
            pool.shutdown()
    for name, ch in changes.items():
        if ch.whole is None:
            parts = found[name]
            ch.pos = np.concatenate([p for p, _ in parts]) if parts else np.empty(0, np.int64)
            ch.vals = np.concatenate([v for _, v in parts]) if parts else np.empty(0, ch.info.uint)
            prev = base.staged.get(name)
            if prev is not None and prev.whole is not None:  # a chain after a tensor sent whole
                whole = prev.whole.copy()
                whole[ch.pos] = ch.vals
                ch.whole, ch.pos, ch.vals = whole, None, None
            elif prev is not None:  # a chain: one set of changes against the committed bits
                ch.pos, ch.vals = _merge(prev, ch)
    return StagedPayload(plan.base, plan.target, list(plan.tensors), changes, plan.payload_bytes)


def _check_base(plan: PayloadPlan, base: Base, keys) -> None:
    """The base the sender diffed against must be exactly the receiver's (names, dtypes,
    shapes, digests)."""
    have = set(base.meta) if keys is None else {k for k in keys if k in base.meta}
    expected = {name: t.base for name, t in plan.tensors.items() if t.base is not None}
    expected.update(plan.removed)
    missing, extra = sorted(set(expected) - have), sorted(have - set(expected))
    if missing or extra:
        raise TensorMismatchError(f"receiver state does not match the delta's base: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}"[:400])
    for name, b in expected.items():
        info, shape = base.meta[name]
        if info.name != b["dtype"] or list(shape) != b["shape"]:
            raise TensorMismatchError(f"tensor {name!r}: receiver has {info.name}{list(shape)}, "
                                      f"the delta's base is {b['dtype']}{b['shape']}")
        h = base.digest(name)
        if h != b["xxh"]:
            raise TensorMismatchError(f"tensor {name!r}: receiver's values differ from the delta's base "
                                      f"(checksum {h} != {b['xxh']})")


def _stage_entry(body, e, spec, ch: KeyChange, base: Base):
    """Decode one entry; verify its resulting range. A delta entry returns (positions, new
    bits) of its changes (positions in the key's flat index); a whole entry fills ch.whole."""
    info, start, stop, enc, where = spec.info, e.start, e.stop, e.enc, e.where
    chunk = body[e.off : e.off + e.length]
    count = stop - start
    if spec.kind == "whole":
        assert ch.whole is not None, "a whole key's array is allocated before its entries are staged"
        ch.whole[start:stop] = decode_dense_chunk(enc, chunk, count, info, where)
        result, out = ch.whole[start:stop], None
    else:
        old = base.bits(e.name, start, stop)
        if enc == "none":
            result, out = old, None
        elif enc in DENSE_ENCODINGS or enc == "mask":
            if enc == "mask":
                result = scratch("stage_result", count, info.uint)
                decode_mask_chunk(chunk, e.changed, old, info, where, result)
            else:
                result = decode_dense_chunk(enc, chunk, count, info, where)
            rel = np.flatnonzero(result != old)
            out = (rel + start, result[rel])
        else:  # gap, ctx, gap8: positions and values
            rel, vals = decode_delta_chunk(enc, chunk, e.changed, old, info, where)
            if patched_digest(old, rel, vals) != e.xxh:
                raise CorruptBucketError(f"{where}: decoded elements [{start}, {stop}) do not match the sender's checksum")
            return rel + start, vals
    if digest(result) != e.xxh:
        raise CorruptBucketError(f"{where}: decoded elements [{start}, {stop}) do not match the sender's checksum")
    return out


def patched_digest(old: np.ndarray, rel: np.ndarray, vals: np.ndarray) -> str:
    """Digest of `old` with `vals` written at (sorted) positions `rel`, without writing `old`.
    The result is built and hashed block by block in a small scratch array that stays in the
    core's cache: a chunk-sized copy would go out to memory and back, and staging is bound by
    memory bandwidth (the copy cost more than decoding the changes)."""
    n = old.shape[0]
    if n == 0:
        return digest(old)
    block = scratch("stage_block", min(n, max(1, VERIFY_BLOCK_BYTES // old.itemsize)), old.dtype)
    h = xxhash.xxh3_64()
    starts = range(0, n, block.shape[0])
    cuts = np.searchsorted(rel, np.fromiter(starts, np.int64, len(starts))).tolist() + [rel.shape[0]]
    for b, lo in enumerate(starts):
        hi = min(lo + block.shape[0], n)
        out = block[: hi - lo]
        np.copyto(out, old[lo:hi])
        if cuts[b + 1] > cuts[b]:
            K.scatter(out, rel[cuts[b] : cuts[b + 1]], vals[cuts[b] : cuts[b + 1]], lo)
        h.update(out)  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12
    return h.hexdigest()


def _merge(prev: KeyChange, new: KeyChange) -> tuple[np.ndarray, np.ndarray]:
    """Changes of two consecutive steps as one set against the committed bits (later wins)."""
    pos = np.concatenate([new.pos, prev.pos])
    vals = np.concatenate([new.vals, prev.vals])
    keep_pos, first = np.unique(pos, return_index=True)  # first occurrence: the newer step's
    return keep_pos, vals[first]
