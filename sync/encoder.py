"""Encoder: encode(old, new) -> self-describing buckets (the wire format is in FORMAT.md).

- every tensor of `new` is split into element-range chunks (at most one bucket of dense bytes,
  and at most MAX_CHUNK_ELEMS elements);
- a chunk of a tensor that exists in `old` with the same dtype and shape is coded as a delta of
  bit patterns ("gap8", byte gaps and values, or above 12.5 % changed the byte-aligned "mask"
  at level fast; "ctx" at level best; see delta_kernels.py), or as its dense bytes when that is smaller (so a payload is
  never larger than the dense snapshot, give or take headers); new, reshaped or dtype-changed
  tensors, and every tensor of a snapshot, go in whole;
- chunks are packed into buckets of about `bucket_bytes`; bucket 0 also carries the manifest:
  every target tensor with its checksum, and the checksum of the base tensor it was computed
  against, so a receiver can prove it holds the right base and that its result is bit-exact.

Pure functions on tensors and bytes (no Ray); decoder.py is the other side.
"""
from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash
import zstandard

from sync import delta_kernels as K
from sync.config import CODEC_LEVELS
from sync.dtypes import DtypeInfo, bits_of, info_for, kernel_params
from sync.format import MAX_CHUNK_ELEMS, MAX_VERSION, RESERVED_NAMES, digest, pack_bucket
from sync.workspace import PARALLEL_MIN_ELEMS, scratch, workers

DENSE_ZSTD_LEVEL = {"fast": 1, "best": 9}
ENTRY_HEADER_BYTES = 256  # rough JSON cost of one entry, for bucket packing
# Level fast: above this change fraction a chunk is coded as "mask" (a change bit per element)
# rather than "gap8" (a gap byte per change): from here on the bitmap is the smaller of the two.
# Both scan at ~0.5-1 ns per element and decode in tens of ns per change; the range-coded "gap"
# (~100 ns and more per change to decode) would make a receiver CPU-bound on fast links.
MASK_MIN_FRAC = 0.125
# ...except in chunks this small, where the range-coded "gap" is tried as well and the smaller
# body is kept: small tensors (biases, norms) cost little in absolute terms and the range
# coder's context models often win on them.
GAP_ALSO_MAX_ELEMS = 1 << 18


def chunk_ranges(numel: int, info: DtypeInfo, bucket_bytes: int) -> list[tuple[int, int]]:
    if numel == 0:
        return [(0, 0)]
    per = max(64, min(MAX_CHUNK_ELEMS, bucket_bytes // (info.width // 8)) // 64 * 64)
    return [(s, min(s + per, numel)) for s in range(0, numel, per)]


# ---------------------------------------------------------------- chunk encoders

Body = bytes | memoryview  # an entry's encoded bytes (a full send's raw body is a view, not a copy)


def _encode_dense(n: np.ndarray, level: str) -> tuple[str, Body]:
    isz = n.itemsize
    raw = n.view(np.uint8)
    if level == "raw":  # a full send: uncompressed, copied once, into its bucket (format.pack_bucket)
        return "raw", memoryview(np.ascontiguousarray(raw))  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12
    planes = raw.reshape(-1, isz).T.tobytes() if isz > 1 else raw.tobytes()
    z = zstandard.ZstdCompressor(level=DENSE_ZSTD_LEVEL[level]).compress(planes)
    if len(z) < raw.nbytes:
        return "planes", z
    return "raw", raw.tobytes()


def _count_changes(o: np.ndarray, n: np.ndarray) -> int:
    return int(K.count_changes_fast(o, n))


def _encode_mask(o: np.ndarray, n: np.ndarray, info: DtypeInfo, changed: int) -> bytes:
    wb = info.width // 8
    buf = np.empty((o.shape[0] + 7) // 8 + changed * (1 + wb) + 1, np.uint8)
    tmp, esc = scratch("tmp", o.shape[0] + 2, np.uint8), np.empty(changed + 1, np.uint64)
    nib = scratch("nib", (o.shape[0] + 7) // 8 * 8, np.uint8)
    used = K.encode_mask(o, n, info.width, kernel_params(info)[-1], buf, tmp, changed, esc, nib)
    if used < 0:
        raise RuntimeError("tensor changed while it was being encoded")
    return zstandard.ZstdCompressor(level=DENSE_ZSTD_LEVEL["fast"], write_content_size=True).compress(buf[:used])  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12


def _gap8_body(o: np.ndarray, n: np.ndarray, info: DtypeInfo, cap: int) -> tuple[int, bytes] | None:
    """(changes, "gap8" body) of a chunk, or None when it has more than `cap` changes (the scan
    is also the count: no separate counting pass). The body: u32 length of frame A, frame A
    (gap bytes, then the gap escapes as 4 byte planes), frame B (value bytes, then the value
    escapes as w/8 byte planes)."""
    wb = info.width // 8
    g, v = scratch("g8_g", cap, np.uint8), scratch("g8_v", cap, np.uint8)
    ge, ve = scratch("g8_ge", cap, np.uint32), scratch("g8_ve", cap, np.uint64)
    per = 8 // o.itemsize
    nw = o.shape[0] // per if o.ctypes.data % 8 == 0 and n.ctypes.data % 8 == 0 else 0
    nch, neg, nev = K.encode_gap8(o, n, o[: nw * per].view(np.uint64), n[: nw * per].view(np.uint64), per,
                                  info.width, kernel_params(info)[-1], g, v, ge, ve)
    if nch < 0:
        return None
    z = zstandard.ZstdCompressor(level=DENSE_ZSTD_LEVEL["fast"], write_content_size=True)
    a = z.compress(g[:nch].tobytes() + ge[:neg].view(np.uint8).reshape(-1, 4).T.tobytes())
    b = z.compress(v[:nch].tobytes() + ve[:nev].view(np.uint8).reshape(-1, 8)[:, :wb].T.tobytes())
    return nch, b"".join((struct.pack("<I", len(a)), a, b))


def _gap_body(o: np.ndarray, n: np.ndarray, info: DtypeInfo, changed: int) -> bytes | None:
    """The "gap" body of a chunk with `changed` (>= 1) changes, or None when it would not fit
    in the chunk's raw size."""
    raw_len = n.nbytes
    out, out2 = np.empty(raw_len + 256, np.uint8), np.empty(raw_len + 256, np.uint8)
    per = 8 // o.itemsize
    nw = o.shape[0] // per
    # one slot per element, but pages are only touched for actual changes
    u_buf, e_buf = np.empty(o.shape[0], np.uint64), np.empty(o.shape[0], np.uint8)
    n1, n2, _ = K.encode_gap(o, n, o[: nw * per].view(np.uint64), n[: nw * per].view(np.uint64), per,
                             *kernel_params(info), out, out2, u_buf, e_buf, K.gap_prior(changed, o.shape[0]))
    if n1 < 0 or n2 < 0:
        return None
    return b"".join((struct.pack("<I", n1), out[:n1].tobytes(), out2[:n2].tobytes()))


def _encode_delta(o: np.ndarray, n: np.ndarray, info: DtypeInfo, level: str) -> tuple[str, Body, int]:
    raw_len = n.nbytes
    body = None
    if level == "fast":
        gap8 = _gap8_body(o, n, info, int(MASK_MIN_FRAC * o.shape[0]))
        changed = gap8[0] if gap8 is not None else _count_changes(o, n)
        if changed == 0:
            return "none", b"", 0
        if gap8 is None:
            enc, body = "mask", _encode_mask(o, n, info, changed)
            if o.shape[0] <= GAP_ALSO_MAX_ELEMS:
                # small chunk: the range coder's time is small in absolute terms and its context
                # models often win on real updates (skewed by the old value's magnitude)
                gbody = _gap_body(o, n, info, changed)
                if gbody is not None and len(gbody) < len(body):
                    enc, body = "gap", gbody
            if len(body) <= raw_len // 2:
                return enc, body, changed
            dense_enc, dense = _encode_dense(n, level)
            return (enc, body, changed) if len(body) <= len(dense) else (dense_enc, dense, changed)
        enc, body = "gap8", gap8[1]
        if o.shape[0] <= GAP_ALSO_MAX_ELEMS:
            gbody = _gap_body(o, n, info, changed)
            if gbody is not None and len(gbody) < len(body):
                enc, body = "gap", gbody
    else:
        out = np.empty(raw_len + 256, np.uint8)
        nbytes, changed = K.encode_ctx(o, n, *kernel_params(info), out, K.flag_prior(_count_changes(o, n), o.shape[0]))
        enc = "ctx"
        if nbytes >= 0:
            body = out[:nbytes].tobytes()
    if body is not None and changed == 0:
        return "none", b"", 0
    if body is None:
        changed = int(np.count_nonzero(o != n))
    elif len(body) <= raw_len // 4:
        return enc, body, int(changed)
    dense_enc, dense = _encode_dense(n, level)
    if body is not None and len(body) <= len(dense):
        return enc, body, int(changed)
    return dense_enc, dense, int(changed)


@dataclass
class _Job:
    name: str
    kind: str  # "delta" | "whole"
    info: DtypeInfo
    shape: list
    start: int
    stop: int
    old: np.ndarray | None
    new: np.ndarray


def _run_job(job: _Job, level: str) -> tuple[dict, Body]:
    n = job.new[job.start : job.stop]
    entry = {
        "name": job.name, "dtype": job.info.name, "shape": job.shape, "kind": job.kind,
        "start": job.start, "stop": job.stop, "xxh": digest(n),
    }
    if job.kind == "delta":
        assert job.old is not None, "a delta job carries its base"
        enc, body, changed = _encode_delta(job.old[job.start : job.stop], n, job.info, level)
    else:
        enc, body = _encode_dense(n, level)
        changed = job.stop - job.start
    entry["enc"] = enc
    entry["changed"] = changed
    return entry, body


def encode(
    old: dict[str, torch.Tensor] | None,
    new: dict[str, torch.Tensor],
    *,
    base_version: int | None,
    target_version: int,
    level: str = "best",
    bucket_bytes: int = 32 << 20,
    metadata: dict[str, str] | None = None,
    digests: dict[str, str] | None = None,
    base_digests: dict[str, str] | None = None,
) -> list[bytes]:
    """Encode `new` as a delta against `old` (or a full snapshot when old is None) into
    self-describing buckets. Tensors are compared by bit pattern; the result is lossless.
    `metadata` (str -> str, e.g. a safetensors header's) travels in bucket 0. `digests` /
    `base_digests`: the xxh3 digests (format.digest) of tensors of `new` / `old` the caller
    already has (a publisher hashes each tensor once), so they are not hashed again."""
    digests, base_digests = digests or {}, base_digests or {}
    if level not in CODEC_LEVELS:
        raise ValueError(f"level must be one of {CODEC_LEVELS}, got {level!r}")
    if not _is_version(target_version):
        raise ValueError(f"target_version must be an int in [0, {MAX_VERSION}], got {target_version!r}")
    if old is not None and not _is_version(base_version):
        raise ValueError(f"a delta (old is not None) needs an int base_version in [0, {MAX_VERSION}], got {base_version!r}")
    if level == "raw":  # a full send: every tensor whole, uncompressed
        old = None
    if old is None:
        base_version = None
    elif base_version is not None and target_version <= base_version:  # an int here (checked above)
        raise ValueError(f"target_version {target_version} must be greater than base_version {base_version}")
    if bucket_bytes < 4096:
        raise ValueError(f"bucket_bytes must be >= 4096, got {bucket_bytes}")
    manifest, removed, jobs = [], [], []
    for name, t in new.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"state entries must be str -> Tensor, got {type(name).__name__} -> {type(t).__name__}")
        if name in RESERVED_NAMES or not name:
            raise ValueError(f"tensor name {name!r} is reserved (safetensors files use it for their header)")
        info = info_for(t.dtype, name)
        nbits = bits_of(t)
        shape = list(t.shape)
        item: dict[str, Any] = {"name": name, "dtype": info.name, "shape": shape, "xxh": digests.get(name) or digest(nbits), "base": None}
        kind, obits = "whole", None
        if old is not None and name in old:
            o = old[name]
            oinfo = info_for(o.dtype, name)
            ob = bits_of(o)
            item["base"] = {"dtype": oinfo.name, "shape": list(o.shape), "xxh": base_digests.get(name) or digest(ob)}
            if o.dtype == t.dtype and tuple(o.shape) == tuple(t.shape):
                kind, obits = "delta", ob
        item["kind"] = kind
        manifest.append(item)
        for start, stop in chunk_ranges(nbits.shape[0], info, bucket_bytes):
            jobs.append(_Job(name, kind, info, shape, start, stop, obits, nbits))
    if old is not None:
        for name, o in old.items():
            if name not in new:
                oinfo = info_for(o.dtype, name)
                removed.append({"name": name, "dtype": oinfo.name, "shape": list(o.shape), "xxh": digest(bits_of(o))})
    total = sum(j.stop - j.start for j in jobs)
    if total >= PARALLEL_MIN_ELEMS and len(jobs) > 1 and workers() > 1:
        with ThreadPoolExecutor(workers()) as pool:
            results = list(pool.map(lambda j: _run_job(j, level), jobs))
    else:
        results = [_run_job(j, level) for j in jobs]
    return _pack(results, manifest, removed, base_version, target_version, level, bucket_bytes, metadata)


def _pack(results, manifest, removed, base_version, target_version, level, bucket_bytes, metadata) -> list[bytes]:
    groups: list[list[tuple[dict, Body]]] = []
    cur: list[tuple[dict, Body]] = []
    size = 0
    for entry, body in results:
        cost = len(body) + ENTRY_HEADER_BYTES
        if cur and size + cost > bucket_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((entry, body))
        size += cost
    groups.append(cur)
    common = {"base": base_version, "target": target_version, "level": level}
    ident = json.dumps([common, manifest, removed], sort_keys=True, separators=(",", ":")).encode()
    payload_id = xxhash.xxh3_64_hexdigest(ident)
    buckets = []
    for i, group in enumerate(groups):
        entries, bodies, off = [], [], 0
        for entry, body in group:
            entries.append(dict(entry, off=off, len=len(body)))
            bodies.append(body)
            off += len(body)
        header = dict(common, payload=payload_id, index=i, count=len(groups), entries=entries)
        if i == 0:
            header["manifest"] = manifest
            header["removed"] = removed
            if metadata:
                header["metadata"] = {str(k): str(v) for k, v in metadata.items()}
        buckets.append(pack_bucket(header, bodies))
    return buckets


def _is_version(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_VERSION
