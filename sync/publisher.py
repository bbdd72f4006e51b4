"""One trainer rank's side of a publish: its slice of the weights in, encoded parts out.

A rank keeps the last published copy of its own slice only (sync/slices.py says which elements
are its), never the full model, plus the buffers the next publish converts into. A publish is
three steps, each a call the driver makes on the rank (sync/transport.py's ShardedPublisher):

    stage(slice, version, dense)  the part plan (no copy yet: stage returns at once, so the
                                  receivers' first fetch is not held up by the whole slice)
    encode_part(i)                part i's copy in the published dtype, and the part as a
                                  payload (a delta against the last published copy, or the
                                  whole part raw when dense), plus its stats and checksums
    snapshot_part(i)              part i of the last published version as a snapshot (catch-up)

Parts are groups of tensors of about `part_bytes` dense bytes, each an independent payload, so
a receiver can fetch and apply part i while part i+1 is still being copied and encoded. The
copy becomes the base of the next delta once its last part is encoded. The slice's tensors are
read when their part is encoded, so from stage to the last encode_part nothing may write the
rank's weights or change its version: a rank's calls run in order and the drivers publish
between steps, and as a guard the rank refuses a part when its version moved since stage
(encode_part's `version`; a write without a version change is not detected).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sync.checksum import checksum_entries
from sync.codec import encode
from sync.config import SyncConfig
from sync.convert import published_copy
from sync.dtypes import bits_of
from sync.format import digest, parse_bucket


@dataclass
class StagedSlice:
    """What the driver learns from `stage` (small, picklable)."""

    version: int
    base_version: int | None  # None: the parts are snapshots
    dense: bool  # the parts are the whole slice, raw (a full send)
    parts: list[list[str]]  # the slice keys of each part
    dense_bytes: int  # of the slice in the published dtype
    numel: int


@dataclass
class PartStats:
    index: int
    payload_bytes: int
    dense_bytes: int
    changed: int
    encode_s: float  # copy, hash and encode
    checksums: dict[str, str]  # the part's keys -> checksum entry (sync/checksum.py)
    nonzero: int  # nonzero elements of the part's copy


def plan_parts(sizes: dict[str, int], part_bytes: int) -> list[list[str]]:
    """Consecutive groups of keys of about `part_bytes` dense bytes each (at least one key),
    from each key's size in bytes."""
    parts: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for key, nbytes in sizes.items():
        if cur and size + nbytes > part_bytes:
            parts.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += nbytes
    if cur or not parts:
        parts.append(cur)
    return parts


class SlicePublisher:
    def __init__(self, cfg: SyncConfig | None = None):
        self.cfg = cfg or SyncConfig()
        self.dtype = getattr(torch, self.cfg.published_dtype)
        self.version: int | None = None  # of the last fully encoded publish
        self._last: dict[str, torch.Tensor] | None = None
        self._last_parts: list[list[str]] = []
        self._source: dict[str, torch.Tensor] = {}  # the staged slice, read part by part
        self._masks: dict[str, torch.Tensor] = {}  # ... and the masks applied to it while converting
        self._next: dict[str, torch.Tensor] | None = None
        # The buffers of the copy before the base (or of a publish that never finished): the
        # next stage converts into them, since fresh tensors of this size cost more in page
        # faults than the conversion itself. So a rank holds two copies of its slice in the
        # published dtype between publishes (together the slice's fp32 size), and allocates none.
        self._spare: dict[str, torch.Tensor] = {}
        self._next_digests: dict[str, str] = {}
        self._last_digests: dict[str, str] = {}
        self._staged: StagedSlice | None = None
        self._encoded: set[int] = set()

    def stage(self, state: dict[str, torch.Tensor], version: int, dense: bool = False,
              masks: dict[str, torch.Tensor] | None = None) -> StagedSlice:
        """Plan publishing this rank's slice (cut) as `version`. The tensors are read, copied
        and hashed when their part is encoded. `masks` (key -> bool tensor of the key's
        elements): what is published of those keys is tensor * mask, applied while converting
        to the published dtype, so a sparsifier's masked weights cost no masked copy."""
        if self.version is not None and version <= self.version:
            raise ValueError(f"publish version {version} must be greater than the last one ({self.version})")
        masks = dict(masks or {})
        unknown = sorted(set(masks) - set(state))
        if unknown:
            raise ValueError(f"masks for keys {unknown[:3]} that the slice does not have")
        for k, m in masks.items():
            if m.dtype != torch.bool or m.numel() != state[k].numel():
                raise ValueError(f"the mask of {k!r} must be bool with its {state[k].numel()} elements, "
                                 f"got {m.dtype} with {m.numel()}")
        if self._next:  # a publish that never finished: its copies are spare buffers now
            self._spare.update(self._next)
        self._source, self._masks, self._next, self._next_digests = dict(state), masks, {}, {}
        sizes = {k: t.numel() * self._published_itemsize(t) for k, t in self._source.items()}
        parts = plan_parts(sizes, self.cfg.part_bytes)
        base = None if (dense or self._last is None) else self.version
        self._staged = StagedSlice(version=version, base_version=base, dense=dense, parts=parts,
                                   dense_bytes=sum(sizes.values()), numel=sum(t.numel() for t in self._source.values()))
        self._encoded = set()
        return self._staged

    def _published_itemsize(self, t: torch.Tensor) -> int:
        return self.dtype.itemsize if t.is_floating_point() else t.element_size()

    def encode_part(self, index: int, version: int | None = None) -> tuple[list[bytes], PartStats]:
        """Part `index` of the staged publish. `version`: the version the caller's weights are
        at now; a part is refused (ValueError) when it is not the staged one."""
        staged = self._staged
        if staged is None or not 0 <= index < len(staged.parts):
            raise ValueError(f"no staged publish with a part {index}")
        if version is not None and version != staged.version:
            raise ValueError(f"the weights moved to version {version} after version {staged.version} was staged "
                             "for publishing; the publish is void")
        keys = staged.parts[index]
        nxt = self._next
        assert nxt is not None, "stage() starts the copies of a publish"
        t0 = time.perf_counter()
        nonzero = 0
        for k in keys:
            # each tensor is hashed once per publish: the checksum, the payload's manifest and,
            # at the next publish, the delta's base all use this digest
            copy, nz = published_copy(self._source[k], self.dtype, out=self._spare.pop(k, None), mask=self._masks.get(k))
            nxt[k], self._next_digests[k] = copy, digest(bits_of(copy))
            nonzero += nz
        new = {k: nxt[k] for k in keys}
        if staged.base_version is None:
            buckets = encode(None, new, base_version=None, target_version=staged.version,
                             level="raw" if staged.dense else self.cfg.level, bucket_bytes=self.cfg.bucket_bytes,
                             digests=self._next_digests)
        else:
            last = self._last
            assert last is not None, "a delta has a last published version"
            old = {k: last[k] for k in keys if k in last}
            buckets = encode(old, new, base_version=staged.base_version, target_version=staged.version,
                             level=self.cfg.level, bucket_bytes=self.cfg.bucket_bytes,
                             digests=self._next_digests, base_digests=self._last_digests)
        stats = PartStats(index, sum(len(b) for b in buckets), sum(t.numel() * t.element_size() for t in new.values()),
                          changed_in(buckets), time.perf_counter() - t0, checksum_entries(new, self._next_digests), nonzero)
        self._encoded.add(index)
        if len(self._encoded) == len(staged.parts):  # the whole version is out: it is the new base
            self._spare = self._last or {}
            self._last, self._last_parts, self.version = self._next, staged.parts, staged.version
            self._last_digests = self._next_digests
            self._next, self._staged, self._source, self._masks = None, None, {}, {}
        return buckets, stats

    def snapshot_part(self, index: int) -> tuple[list[bytes], PartStats]:
        """Part `index` of the last published version as a snapshot (a receiver that is behind)."""
        if self._last is None or self.version is None or not 0 <= index < len(self._last_parts):
            raise ValueError(f"nothing published with a part {index}")
        t0 = time.perf_counter()
        new = {k: self._last[k] for k in self._last_parts[index]}
        buckets = encode(None, new, base_version=None, target_version=self.version, level=self.cfg.level,
                         bucket_bytes=self.cfg.bucket_bytes, digests=self._last_digests)
        return buckets, PartStats(index, sum(len(b) for b in buckets),
                                  sum(t.numel() * t.element_size() for t in new.values()), 0, time.perf_counter() - t0,
                                  {}, 0)

    def standing_bytes(self) -> int:
        """Bytes of the copies this publisher holds between publishes (the last published slice,
        the spare buffers the next publish converts into, a publish's copies not yet base)."""
        seen, total = set(), 0
        for d in (self._last or {}, self._spare, self._next or {}):
            for t in d.values():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    def last_published(self) -> dict[str, torch.Tensor]:
        """Copies of the last published slice (its buffers are reused by later publishes)."""
        return {k: t.clone() for k, t in (self._last or {}).items()}


def changed_in(buckets: list[bytes]) -> int:
    """Changed elements of delta entries in our own payload (headers only: no full re-check)."""
    return sum(e["changed"] for i, b in enumerate(buckets) for e in parse_bucket(b, i).header["entries"]
               if e["kind"] == "delta")
