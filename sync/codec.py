"""Lossless sparse-delta codec: encode(old, new) -> buckets, apply(state, buckets) -> new state.

Pure functions on tensors and bytes (no Ray). The wire format is in FORMAT.md; in short:
- every tensor of `new` is split into element-range chunks (at most one bucket of dense bytes);
- a chunk of a tensor that exists in `old` with the same dtype and shape is coded as a delta of
  bit patterns ("gap" or, above 1.5 % changed, the byte-aligned "mask" at level fast; "ctx" at
  level best; see delta_kernels.py), or as its dense
  bytes when that is smaller (so a payload is never larger than the dense snapshot, give or take
  headers); new, reshaped or dtype-changed tensors, and every tensor of a snapshot, go in whole;
- chunks are packed into buckets of about `bucket_bytes`; bucket 0 also carries the manifest:
  every target tensor with its checksum, and the checksum of the base tensor it was computed
  against, so a receiver can prove it holds the right base and that its result is bit-exact.

apply() checks everything before it returns, and never writes into `state`.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash
import zstandard

from sync import delta_kernels as K
from sync.config import CODEC_LEVELS
from sync.dtypes import DtypeInfo, bits_of, info_by_name, info_for
from sync.errors import CorruptBucketError, NotADeltaError, SyncError, TensorMismatchError, VersionMismatchError
from sync.format import Bucket, digest, pack_bucket, parse_bucket

DENSE_ZSTD_LEVEL = {"fast": 1, "best": 9}
MAX_CHUNK_ELEMS = 1 << 22  # bounds decoder memory and gives the threads balanced work units
ENTRY_HEADER_BYTES = 256  # rough JSON cost of one entry, for bucket packing
PARALLEL_MIN_ELEMS = 1 << 20
DELTA_ENCODINGS = ("none", "gap", "ctx", "mask")
# Level fast: above this change fraction a chunk is coded as "mask" (byte-aligned, zstd) rather
# than "gap": the range coder's time grows with the changes, and from here on it would be
# slower than zstd-1 on the dense bytes (ANCHORS: encode must never make sync slower).
MASK_MIN_FRAC = 0.015
# ...except in chunks this small, where "gap" is tried as well and the smaller body is kept.
GAP_ALSO_MAX_ELEMS = 1 << 18
DENSE_ENCODINGS = ("planes", "raw")
_INT_NUMPY = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}


def _workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _kernel_params(info: DtypeInfo) -> tuple:
    mask = np.uint64((1 << info.width) - 1)
    return (info.ctx_kind, info.mant_bits, info.exp_mask, info.exp_drop, info.width, mask)


def chunk_ranges(numel: int, info: DtypeInfo, bucket_bytes: int) -> list[tuple[int, int]]:
    if numel == 0:
        return [(0, 0)]
    per = max(64, min(MAX_CHUNK_ELEMS, bucket_bytes // (info.width // 8)) // 64 * 64)
    return [(s, min(s + per, numel)) for s in range(0, numel, per)]


# ---------------------------------------------------------------- chunk encoders


def _encode_dense(n: np.ndarray, level: str) -> tuple[str, bytes]:
    isz = n.itemsize
    raw = n.view(np.uint8)
    if level == "raw":
        return "raw", raw.tobytes()
    planes = raw.reshape(-1, isz).T.tobytes() if isz > 1 else raw.tobytes()
    z = zstandard.ZstdCompressor(level=DENSE_ZSTD_LEVEL[level]).compress(planes)
    if len(z) < raw.nbytes:
        return "planes", z
    return "raw", raw.tobytes()


def _count_changes(o: np.ndarray, n: np.ndarray) -> int:
    return int(K.count_changes_fast(o, n))


_SCRATCH = threading.local()


def _scratch(name: str, size: int, dtype) -> np.ndarray:
    """A per-thread work array, reused across chunks (fresh ones would page-fault every time)."""
    have = getattr(_SCRATCH, name, None)
    if have is None or have.shape[0] < size:
        have = np.empty(max(size, 1 << 16), dtype)
        setattr(_SCRATCH, name, have)
    return have[:size]


def _encode_mask(o: np.ndarray, n: np.ndarray, info: DtypeInfo, changed: int) -> bytes:
    wb = info.width // 8
    buf = np.empty((o.shape[0] + 7) // 8 + changed * (1 + wb) + 1, np.uint8)
    tmp, esc = _scratch("tmp", o.shape[0] + 2, np.uint8), np.empty(changed + 1, np.uint64)
    nib = _scratch("nib", (o.shape[0] + 7) // 8 * 8, np.uint8)
    used = K.encode_mask(o, n, info.width, _kernel_params(info)[-1], buf, tmp, changed, esc, nib)
    if used < 0:
        raise RuntimeError("tensor changed while it was being encoded")
    return zstandard.ZstdCompressor(level=DENSE_ZSTD_LEVEL["fast"], write_content_size=True).compress(buf[:used])


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
                             *_kernel_params(info), out, out2, u_buf, e_buf, K.gap_prior(changed, o.shape[0]))
    if n1 < 0 or n2 < 0:
        return None
    return b"".join((struct.pack("<I", n1), out[:n1].tobytes(), out2[:n2].tobytes()))


def _encode_delta(o: np.ndarray, n: np.ndarray, info: DtypeInfo, level: str) -> tuple[str, bytes, int]:
    raw_len = n.nbytes
    body = None
    if level == "fast":
        changed = _count_changes(o, n)
        if changed == 0:
            return "none", b"", 0
        if changed > MASK_MIN_FRAC * o.shape[0]:
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
        enc = "gap"
        body = _gap_body(o, n, info, changed)
    else:
        out = np.empty(raw_len + 256, np.uint8)
        nbytes, changed = K.encode_ctx(o, n, *_kernel_params(info), out, K.flag_prior(_count_changes(o, n), o.shape[0]))
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


def _run_job(job: _Job, level: str) -> tuple[dict, bytes]:
    n = job.new[job.start : job.stop]
    entry = {
        "name": job.name, "dtype": job.info.name, "shape": job.shape, "kind": job.kind,
        "start": job.start, "stop": job.stop, "xxh": digest(n),
    }
    if job.kind == "delta":
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
) -> list[bytes]:
    """Encode `new` as a delta against `old` (or a full snapshot when old is None) into
    self-describing buckets. Tensors are compared by bit pattern; the result is lossless.
    `metadata` (str -> str, e.g. a safetensors header's) travels in bucket 0."""
    if level not in CODEC_LEVELS:
        raise ValueError(f"level must be one of {CODEC_LEVELS}, got {level!r}")
    if not isinstance(target_version, int):
        raise ValueError(f"target_version must be an int, got {target_version!r}")
    if old is not None and not isinstance(base_version, int):
        raise ValueError("a delta (old is not None) needs an integer base_version")
    if level == "raw":  # a full send: every tensor whole, uncompressed
        old = None
    if old is None:
        base_version = None
    if bucket_bytes < 4096:
        raise ValueError(f"bucket_bytes must be >= 4096, got {bucket_bytes}")
    manifest, removed, jobs = [], [], []
    for name, t in new.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"state entries must be str -> Tensor, got {type(name).__name__} -> {type(t).__name__}")
        info = info_for(t.dtype, name)
        nbits = bits_of(t)
        shape = list(t.shape)
        item = {"name": name, "dtype": info.name, "shape": shape, "xxh": digest(nbits), "base": None}
        kind, obits = "whole", None
        if old is not None and name in old:
            o = old[name]
            oinfo = info_for(o.dtype, name)
            ob = bits_of(o)
            item["base"] = {"dtype": oinfo.name, "shape": list(o.shape), "xxh": digest(ob)}
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
    if total >= PARALLEL_MIN_ELEMS and len(jobs) > 1 and _workers() > 1:
        with ThreadPoolExecutor(_workers()) as pool:
            results = list(pool.map(lambda j: _run_job(j, level), jobs))
    else:
        results = [_run_job(j, level) for j in jobs]
    return _pack(results, manifest, removed, base_version, target_version, level, bucket_bytes, metadata)


def _pack(results, manifest, removed, base_version, target_version, level, bucket_bytes, metadata) -> list[bytes]:
    groups, cur, size = [], [], 0
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
        buckets.append(pack_bucket(header, b"".join(bodies)))
    return buckets


# ---------------------------------------------------------------- decoding


def _decode_dense(enc: str, body: memoryview, count: int, info: DtypeInfo, where: str) -> np.ndarray:
    isz = info.width // 8
    nbytes = count * isz
    if enc == "raw":
        if len(body) != nbytes:
            raise CorruptBucketError(f"{where}: raw body has {len(body)} bytes, expected {nbytes}")
        return np.frombuffer(body, dtype=info.uint).copy()
    try:
        size = zstandard.frame_content_size(body)
        if size != nbytes:
            raise CorruptBucketError(f"{where}: compressed body holds {size} bytes, expected {nbytes}")
        data = zstandard.ZstdDecompressor().decompress(body)
    except zstandard.ZstdError as e:
        raise CorruptBucketError(f"{where}: compressed body is corrupt ({e})") from None
    if len(data) != nbytes:
        raise CorruptBucketError(f"{where}: decompressed {len(data)} bytes, expected {nbytes}")
    planes = np.frombuffer(data, dtype=np.uint8)
    if isz > 1:
        planes = planes.reshape(isz, count).T
    return np.ascontiguousarray(planes).view(info.uint).reshape(-1)


def _decode_mask(body: memoryview, changed: int, old: np.ndarray, info: DtypeInfo, where: str, dst: np.ndarray) -> None:
    """New bit patterns of the whole chunk from a "mask" body (see FORMAT.md), into `dst`
    (which may be `old` itself: the kernel reads each element before writing it)."""
    n = old.shape[0]
    if changed < 1 or changed > n:
        raise CorruptBucketError(f"{where}: {changed} changes in a chunk of {n} elements")
    ng, wb = (n + 7) // 8, info.width // 8
    least = ng + (changed + 1) // 2
    most = least + changed * wb
    try:
        size = zstandard.frame_content_size(body)
        if size < least or size > most or (size - least) % wb:
            raise CorruptBucketError(f"{where}: mask body holds {size} bytes, expected {least} + a multiple of {wb} up to {most}")
        data = np.frombuffer(zstandard.ZstdDecompressor().decompress(body), np.uint8)
    except zstandard.ZstdError as e:
        raise CorruptBucketError(f"{where}: compressed body is corrupt ({e})") from None
    if data.shape[0] != size:
        raise CorruptBucketError(f"{where}: mask body decompressed to {data.shape[0]} bytes, its frame says {size}")
    scratch, vals = _scratch("d", ng * 8, np.uint8), _scratch("vals", changed + 1, np.uint8)
    if K.decode_mask(old, data, changed, info.width, _kernel_params(info)[-1], dst, scratch, vals) != 0:
        raise CorruptBucketError(f"{where}: mask stream is corrupt (change masks and values disagree)")


def _decode_delta(enc: str, body: memoryview, changed: int, old: np.ndarray, info: DtypeInfo, where: str):
    """Positions (relative to the chunk) and new bit patterns of the changed elements."""
    if changed < 1 or changed > old.shape[0]:
        raise CorruptBucketError(f"{where}: {changed} changes in a chunk of {old.shape[0]} elements")
    buf = np.frombuffer(body, dtype=np.uint8)
    pos = np.empty(changed, np.int64)
    vals = np.empty(changed, info.uint)
    params = _kernel_params(info)
    if enc == "gap":
        n1 = struct.unpack_from("<I", buf, 0)[0] if len(buf) >= 4 else -1
        if n1 < 0 or 4 + n1 > len(buf):
            raise CorruptBucketError(f"{where}: gap stream length {n1} does not fit a body of {len(buf)} bytes")
        status = K.decode_gap_positions(old.shape[0], buf[4 : 4 + n1], changed, pos, K.gap_prior(changed, old.shape[0]))
        if status == 0:
            e = np.empty(changed, np.uint8)
            K.gather_ctx(old, pos, *params[:-1], e)
            u = np.empty(changed, np.uint64)
            status = K.decode_values(buf[4 + n1 :], e, info.width, u)
        if status == 0:
            K.gather_apply(old, pos, u, params[-1], vals)
    else:
        status = K.decode_ctx(old, buf, changed, *params, pos, vals, K.flag_prior(changed, old.shape[0]))
    if status != 0:
        raise CorruptBucketError(f"{where}: {enc} stream is corrupt (decoder status {status})")
    return pos, vals


@dataclass
class DecodedPayload:
    """What decoding one payload produced. `arrays` maps each tensor whose bits changed to its
    new bit array; `ops` replays the same change onto another copy of the base state."""
    base_version: int | None
    target_version: int
    level: str
    order: list[str]
    meta: dict  # name -> (DtypeInfo, shape)
    arrays: dict  # name -> np.ndarray (uint bits, flat)
    whole: set  # names whose arrays are new tensors (not edits of a base tensor)
    removed: list[str]
    ops: list = field(default_factory=list)  # (name, "scatter", positions, values) | (name, "range", start, values)
    undo: list = field(default_factory=list)  # in-place mode: (array, positions or slice, old values)
    payload_bytes: int = 0
    dense_bytes: int = 0
    changed: int = 0

    def rollback(self) -> None:
        for arr, where, vals in reversed(self.undo):
            arr[where] = vals
        self.undo.clear()


def _need(h: dict, key: str, types, where: str):
    v = h.get(key) if isinstance(h, dict) else None
    if not isinstance(v, types) or (isinstance(v, bool) and types is int):
        raise CorruptBucketError(f"{where}: header field {key!r} is missing or malformed ({v!r})")
    return v


def _shape(v, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        raise CorruptBucketError(f"{where}: malformed shape {v!r}")
    return tuple(v)


def _check_sequence(parsed: list[Bucket]) -> dict:
    h0 = parsed[0].header
    common = {
        "payload": _need(h0, "payload", str, "bucket 0"),
        "base": h0.get("base"),
        "target": _need(h0, "target", int, "bucket 0"),
        "level": _need(h0, "level", str, "bucket 0"),
    }
    if common["base"] is not None and not isinstance(common["base"], int):
        raise CorruptBucketError(f"bucket 0: malformed base version {common['base']!r}")
    for i, b in enumerate(parsed):
        h = b.header
        where = f"bucket at position {i}"
        if h.get("payload") != common["payload"]:
            raise CorruptBucketError(f"{where} belongs to payload {h.get('payload')!r}, not {common['payload']!r} (buckets of different payloads mixed)")
        for key in ("base", "target", "level"):
            if h.get(key) != common[key]:
                raise CorruptBucketError(f"{where}: {key} {h.get(key)!r} differs from bucket 0's {common[key]!r}")
        if h.get("count") != len(parsed):
            raise CorruptBucketError(f"{where}: payload has {h.get('count')!r} buckets, {len(parsed)} were given (dropped or duplicated bucket)")
        if h.get("index") != i:
            raise CorruptBucketError(f"{where} has index {h.get('index')!r} (buckets reordered, dropped or duplicated)")
        if (i == 0) != ("manifest" in h):
            raise CorruptBucketError(f"{where}: the manifest must be in bucket 0 and only there")
        _need(h, "entries", list, where)
    return common


def decode_into(
    state: dict[str, torch.Tensor], version: int | None, buckets: list, *, in_place: bool
) -> DecodedPayload:
    """Decode and verify a payload against `state`. With in_place=False, changed tensors are
    copied first (state untouched). With in_place=True the CPU tensors of `state` are edited
    directly and every edit is logged in `undo`; on any error the edits are rolled back before
    the error propagates. Raises SyncError subclasses only."""
    if not isinstance(buckets, (list, tuple)) or not buckets:
        raise NotADeltaError("payload has no buckets")
    parsed = [parse_bucket(b, i) for i, b in enumerate(buckets)]
    result = None
    try:
        common = _check_sequence(parsed)
        result = _decode_checked(state, version, parsed, common, in_place)
        return result
    except SyncError:
        if result is not None:
            result.rollback()
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise CorruptBucketError(f"malformed payload header: {type(e).__name__}: {e}") from None


def _decode_checked(state, version, parsed, common, in_place) -> DecodedPayload:
    h0 = parsed[0].header
    base, target = common["base"], common["target"]
    if base is not None and version != base:
        raise VersionMismatchError(f"payload is a delta {base} -> {target}; it needs a receiver at version {base}, this one is at {version}")
    manifest = _need(h0, "manifest", list, "bucket 0")
    removed = _need(h0, "removed", list, "bucket 0")
    meta, order, base_xxh = {}, [], {}
    for m in manifest:
        where = "bucket 0 manifest"
        name = _need(m, "name", str, where)
        if name in meta:
            raise CorruptBucketError(f"{where}: tensor {name!r} listed twice")
        meta[name] = (info_by_name(_need(m, "dtype", str, where), name), _shape(m.get("shape"), where))
        order.append(name)
        if m.get("kind") not in ("delta", "whole"):
            raise CorruptBucketError(f"{where}: tensor {name!r} has kind {m.get('kind')!r}")
    # The base the sender diffed against must be exactly what the receiver holds.
    expected_base = {}
    for m in manifest:
        if m.get("base") is not None:
            expected_base[m["name"]] = m["base"]
        elif m["kind"] == "delta":
            raise CorruptBucketError(f"bucket 0 manifest: delta tensor {m['name']!r} has no base")
    for r in removed:
        expected_base[_need(r, "name", str, "bucket 0 removed")] = r
    if base is None:
        if expected_base:
            raise CorruptBucketError("bucket 0: a snapshot must not name base tensors")
    else:
        missing = sorted(set(expected_base) - set(state))
        extra = sorted(set(state) - set(expected_base))
        if missing or extra:
            raise TensorMismatchError(
                f"receiver state does not match the delta's base: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, b in expected_base.items():
            t = state[name]
            info = info_for(t.dtype, name)
            if info.name != b.get("dtype") or list(t.shape) != b.get("shape"):
                raise TensorMismatchError(
                    f"tensor {name!r}: receiver has {info.name}{list(t.shape)}, the delta's base is {b.get('dtype')}{b.get('shape')}"
                )
            h = digest(bits_of(t))
            if h != b.get("xxh"):
                raise TensorMismatchError(f"tensor {name!r}: receiver's values differ from the delta's base (checksum {h} != {b.get('xxh')})")
            base_xxh[name] = h
    out = DecodedPayload(
        base_version=base, target_version=target, level=common["level"], order=order, meta=meta,
        arrays={}, whole=set(), removed=[r["name"] for r in removed],
        payload_bytes=sum(b.nbytes for b in parsed),
    )
    try:
        _decode_entries(state, parsed, manifest, meta, out, in_place)
        for m in manifest:
            name = m["name"]
            h = digest(out.arrays[name]) if name in out.arrays else base_xxh.get(name)
            if h != m.get("xxh"):
                raise CorruptBucketError(f"tensor {name!r}: decoded result checksum {h} != sender's {m.get('xxh')}")
    except BaseException:
        out.rollback()
        raise
    return out


def _decode_entries(state, parsed, manifest, meta, out: DecodedPayload, in_place: bool) -> None:
    kinds = {m["name"]: m["kind"] for m in manifest}
    next_start = {name: 0 for name in meta}
    seen = set()
    pool = ThreadPoolExecutor(_workers()) if _workers() > 1 else None
    try:
        for bi, b in enumerate(parsed):
            # 1) check every entry of the bucket, 2) decode their streams (in parallel: the
            # kernels release the GIL and only read the base), 3) write and verify in order.
            tasks = [_plan_entry(state, b.body, bi, ei, e, meta, kinds, next_start, seen, out, in_place)
                     for ei, e in enumerate(b.header["entries"])]
            work = [t for t in tasks if t["decode"] is not None]
            total = sum(t["stop"] - t["start"] for t in work)
            if pool is not None and len(work) > 1 and total >= PARALLEL_MIN_ELEMS:
                results = list(pool.map(lambda t: t["decode"](), work))
            else:
                results = [t["decode"]() for t in work]
            for t, r in zip(work, results):
                t["result"] = r
            for t in tasks:
                _write_entry(t, out, in_place)
    finally:
        if pool is not None:
            pool.shutdown()
    for name, (info, shape) in meta.items():
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if name not in seen or next_start[name] != numel:
            raise CorruptBucketError(f"tensor {name!r}: payload covers elements [0, {next_start[name]}) of {numel} (missing bucket?)")


def _plan_entry(state, body, bi, ei, e, meta, kinds, next_start, seen, out, in_place) -> dict:
    where = f"bucket {bi} entry {ei}"
    name = _need(e, "name", str, where)
    if name not in meta:
        raise CorruptBucketError(f"{where}: tensor {name!r} is not in the manifest")
    info, shape = meta[name]
    where = f"bucket {bi} entry {ei} ({name!r})"
    if e.get("dtype") != info.name or _shape(e.get("shape"), where) != shape or e.get("kind") != kinds[name]:
        raise CorruptBucketError(f"{where}: dtype/shape/kind differ from the manifest")
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    start, stop = _need(e, "start", int, where), _need(e, "stop", int, where)
    if start != next_start[name] or stop > numel or (stop <= start and not (numel == 0 and stop == start == 0)):
        raise CorruptBucketError(f"{where}: element range [{start}, {stop}) is out of order or out of bounds (tensor has {numel})")
    next_start[name] = stop
    seen.add(name)
    off, ln = _need(e, "off", int, where), _need(e, "len", int, where)
    if off < 0 or ln < 0 or off + ln > len(body):
        raise CorruptBucketError(f"{where}: body slice [{off}, {off + ln}) outside a body of {len(body)} bytes")
    chunk = body[off : off + ln]
    enc = _need(e, "enc", str, where)
    changed = _need(e, "changed", int, where)
    xxh = _need(e, "xxh", str, where)
    out.dense_bytes += (stop - start) * info.width // 8
    task = {"name": name, "start": start, "stop": stop, "enc": enc, "changed": changed, "xxh": xxh,
            "where": where, "decode": None, "whole": kinds[name] == "whole"}
    if task["whole"]:
        if enc not in DENSE_ENCODINGS:
            raise CorruptBucketError(f"{where}: encoding {enc!r} is not valid for a whole tensor")
        arr = out.arrays.get(name)
        if arr is None:
            arr = out.arrays[name] = np.empty(numel, info.uint)
            out.whole.add(name)
        task["decode"] = lambda: _decode_dense(enc, chunk, stop - start, info, where)
    else:
        src = bits_of(state[name])
        arr = out.arrays.get(name)
        if arr is None:
            arr = src
            if in_place:
                if enc != "none" and arr.ctypes.data != state[name].data_ptr():
                    raise RuntimeError(f"in-place decode needs CPU contiguous tensors ({name!r})")
            elif enc != "none":
                # a fresh array that the entries fill range by range (the decode tasks do it in
                # parallel) rather than one serial copy of the whole tensor first
                arr = np.empty_like(src)
                arr[:start] = src[:start]
            if enc != "none":
                out.arrays[name] = arr
        elif not in_place and enc == "none":
            arr[start:stop] = src[start:stop]
        if enc == "none":
            if ln != 0 or changed != 0:
                raise CorruptBucketError(f"{where}: 'none' entry with a body or changes")
        elif enc == "mask":
            # decoded straight into the result range: no temporary, no extra copy
            old, dst = src[start:stop], arr[start:stop]
            if in_place:
                # the task itself copies and logs the undo before it writes (in parallel, and
                # a task that never runs logs nothing)
                def decode_logged(arr=arr, old=old, dst=dst, chunk=chunk, changed=changed, where=where, start=start, stop=stop):
                    out.undo.append((arr, slice(start, stop), old.copy()))
                    _decode_mask(chunk, changed, old, info, where, dst)

                task["decode"] = decode_logged
            else:
                task["decode"] = lambda: _decode_mask(chunk, changed, old, info, where, dst)
        elif enc in ("gap", "ctx"):
            base, dst = src[start:stop], arr[start:stop]
            if in_place or dst is base:
                task["decode"] = lambda: _decode_delta(enc, chunk, changed, base, info, where)
            else:  # fresh result array: the unchanged elements come from the base
                task["decode"] = lambda: (np.copyto(dst, base), _decode_delta(enc, chunk, changed, base, info, where))[1]
        elif enc in DENSE_ENCODINGS:
            task["decode"] = lambda: _decode_dense(enc, chunk, stop - start, info, where)
        else:
            raise CorruptBucketError(f"{where}: unknown encoding {enc!r}")
    task["arr"] = arr
    return task


def _write_entry(t: dict, out: DecodedPayload, in_place: bool) -> None:
    arr, start, stop, name = t["arr"], t["start"], t["stop"], t["name"]
    if t["whole"]:
        arr[start:stop] = t["result"]
    elif t["enc"] in ("gap", "ctx"):
        pos, vals = t["result"]
        pos += start
        if in_place:
            out.undo.append((arr, pos, arr[pos]))
        arr[pos] = vals
        out.ops.append((name, "scatter", pos, vals))
        out.changed += t["changed"]
    elif t["enc"] == "mask":  # already decoded in place
        out.ops.append((name, "range", start, arr[start:stop]))
        out.changed += t["changed"]
    elif t["enc"] in DENSE_ENCODINGS:
        vals = t["result"]
        if in_place:
            out.undo.append((arr, slice(start, stop), arr[start:stop].copy()))
        arr[start:stop] = vals
        out.ops.append((name, "range", start, vals))
        out.changed += t["changed"]
    if digest(arr[start:stop]) != t["xxh"]:
        raise CorruptBucketError(f"{t['where']}: decoded elements [{start}, {stop}) do not match the sender's checksum")


def tensor_from_bits(arr: np.ndarray, info: DtypeInfo, shape) -> torch.Tensor:
    """A torch tensor (sharing memory) holding the given bit patterns."""
    t = torch.from_numpy(arr.view(_INT_NUMPY[info.width]))
    return t.view(info.torch_dtype).reshape(shape)


def apply(
    state: dict[str, torch.Tensor], version: int | None, buckets: list[bytes]
) -> tuple[dict[str, torch.Tensor], int]:
    """Apply a payload to `state` (never mutated). Returns (new_state, new_version).
    Tensors the payload leaves unchanged are shared with `state`, not copied."""
    res = decode_into(state, version, buckets, in_place=False)
    new_state = {}
    for name in res.order:
        info, shape = res.meta[name]
        if name in res.arrays:
            t = tensor_from_bits(res.arrays[name], info, shape)
            if name in state and name not in res.whole and state[name].device.type != "cpu":
                t = t.to(state[name].device)
            new_state[name] = t
        else:
            new_state[name] = state[name]
    return new_state, res.target_version


def inspect_payload(buckets: list) -> dict:
    """Describe a payload without applying it (checks structure and bucket checksums)."""
    if not isinstance(buckets, (list, tuple)) or not buckets:
        raise NotADeltaError("payload has no buckets")
    parsed = [parse_bucket(b, i) for i, b in enumerate(buckets)]
    try:
        common = _check_sequence(parsed)
        h0 = parsed[0].header
        tensors = {}
        for m in _need(h0, "manifest", list, "bucket 0"):
            info = info_by_name(m["dtype"], m["name"])
            shape = _shape(m["shape"], "bucket 0 manifest")
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            tensors[m["name"]] = {
                "dtype": info.name, "shape": list(shape), "kind": m["kind"], "numel": numel, "changed": 0,
                "payload_bytes": 0, "dense_bytes": numel * info.width // 8, "encodings": [],
            }
        for b in parsed:
            for e in b.header["entries"]:
                t = tensors[e["name"]]
                t["changed"] += int(e["changed"])
                t["payload_bytes"] += int(e["len"])
                if e["enc"] not in t["encodings"]:
                    t["encodings"].append(e["enc"])
        removed = [r["name"] for r in _need(h0, "removed", list, "bucket 0")]
        metadata = h0.get("metadata") or {}
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptBucketError(f"malformed payload header: {type(e).__name__}: {e}") from None
    payload = sum(b.nbytes for b in parsed)
    dense = sum(t["dense_bytes"] for t in tensors.values())
    return {
        "base_version": common["base"], "target_version": common["target"], "level": common["level"],
        "kind": "snapshot" if common["base"] is None else "delta", "buckets": len(parsed),
        "payload_bytes": payload, "dense_bytes": dense, "ratio": dense / max(1, payload),
        "changed": sum(t["changed"] for t in tensors.values() if t["kind"] == "delta"),
        "tensors": tensors, "removed": removed, "metadata": metadata,
    }
