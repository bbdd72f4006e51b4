"""Decoder: check a payload's every declared field and size first, then decode and verify it.

decode_into(state, version, buckets) -> DecodedPayload, apply(state, version, buckets) -> new
state, inspect_payload(buckets) -> a description. The wire format is in FORMAT.md.

Two passes. plan_payload() reads every bucket's header and checks it completely before anything
is allocated or decompressed: types (integers are ints, not booleans or floats), ranges
(non-negative, element counts computed in Python integers, so nothing overflows), versions
(target > base), names (unique, not reserved by safetensors), encodings per kind, element
ranges that cover each tensor contiguously in chunks of at most MAX_CHUNK_ELEMS, body slices
inside their body, and sizes: a delta entry's dtype and shape equal its base's (so the receiver's
own tensors bound what a delta can allocate), and the bytes of the tensors the payload creates
(a snapshot, or new tensors in a delta) are at most `max_bytes`. Then decode_into() checks the
receiver's version and base tensors, decodes bucket by bucket and verifies every range and every
tensor against the sender's checksums. Every failure is a SyncError subclass naming the field;
decode_into() never leaves `state` changed when it fails.
"""
from __future__ import annotations

import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zstandard

from sync.config import CODEC_LEVELS
from sync.dtypes import BY_NAME, DtypeInfo, bits_of, info_for, kernel_params, tensor_from_bits
from sync.errors import CorruptBucketError, LimitError, NotADeltaError, SyncError, TensorMismatchError, VersionMismatchError
from sync.format import (DELTA_ENCODINGS, DENSE_ENCODINGS, MAX_CHUNK_ELEMS, MAX_DIMS, MAX_HEADER_BYTES, MAX_NAME_CHARS,
                         MAX_VERSION, RESERVED_NAMES, Bucket, digest, parse_bucket)
from sync.workspace import PARALLEL_MIN_ELEMS, scratch, workers

if TYPE_CHECKING:
    import torch

# Bytes of tensors one payload may create (a snapshot; new tensors in a delta) unless the
# caller passes max_bytes: a sanity bound far above real models' slices. The CLI's default is
# much lower (sync/cli.py, --max-bytes).
DEFAULT_MAX_BYTES = 1 << 40
MAX_ELEMS = 1 << 56  # any one tensor: keeps every derived byte count well inside int64
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class TensorSpec:
    """One manifest item, checked."""
    name: str
    info: DtypeInfo
    shape: tuple
    numel: int
    kind: str  # "delta" | "whole"
    xxh: str
    base: dict | None  # {"dtype", "shape", "xxh"} of the base tensor, checked


@dataclass(frozen=True)
class EntrySpec:
    """One tensor entry of a bucket, checked against its manifest item and its bucket's body."""
    name: str
    start: int
    stop: int
    enc: str
    changed: int
    off: int
    length: int
    xxh: str
    where: str


@dataclass
class PayloadPlan:
    """Everything a payload's headers declare, checked; nothing decoded yet."""
    payload: str
    base: int | None
    target: int
    level: str
    tensors: dict  # name -> TensorSpec, in manifest order
    removed: dict  # name -> {"dtype", "shape", "xxh"}
    entries: list  # per bucket: list[EntrySpec]
    metadata: dict
    payload_bytes: int
    new_bytes: int  # bytes of the whole tensors decoding allocates


# ---------------------------------------------------------------- field checks


def _field(h, key: str, where: str):
    if not isinstance(h, dict):
        raise CorruptBucketError(f"{where}: expected a JSON object, got {type(h).__name__}")
    if key not in h:
        raise CorruptBucketError(f"{where}: header field {key!r} is missing")
    return h[key]


def _int(h, key: str, where: str, lo: int = 0, hi: int = MAX_ELEMS) -> int:
    v = _field(h, key, where)
    if not isinstance(v, int) or isinstance(v, bool):
        raise CorruptBucketError(f"{where}: header field {key!r} must be an integer, got {v!r}"[:300])
    if not lo <= v <= hi:
        raise CorruptBucketError(f"{where}: header field {key!r} is {v}, expected {lo}..{hi}")
    return v


def _str(h, key: str, where: str, choices=None, pattern=None, max_chars: int = MAX_NAME_CHARS) -> str:
    v = _field(h, key, where)
    if not isinstance(v, str) or len(v) > max_chars:
        raise CorruptBucketError(f"{where}: header field {key!r} must be a string, got {v!r}"[:300])
    if choices is not None and v not in choices:
        raise CorruptBucketError(f"{where}: header field {key!r} is {v!r}, expected one of {list(choices)}"[:300])
    if pattern is not None and not pattern.match(v):
        raise CorruptBucketError(f"{where}: header field {key!r} is {v!r}, expected 16 hex digits"[:300])
    return v


def _list(h, key: str, where: str) -> list:
    v = _field(h, key, where)
    if not isinstance(v, list):
        raise CorruptBucketError(f"{where}: header field {key!r} must be a list, got {type(v).__name__}")
    return v


def _version(h, key: str, where: str) -> int:
    return _int(h, key, where, 0, MAX_VERSION)


def _name(h, where: str) -> str:
    name = _str(h, "name", where)
    if not name or name in RESERVED_NAMES:
        raise CorruptBucketError(f"{where}: tensor name {name!r} is reserved or empty")
    return name


def _dtype(h, where: str) -> DtypeInfo:
    return BY_NAME[_str(h, "dtype", where, choices=BY_NAME)]


def _shape(h, where: str) -> tuple[tuple, int]:
    """(shape, element count); the count in Python integers, bounded by MAX_ELEMS."""
    v = _field(h, "shape", where)
    if not isinstance(v, list) or len(v) > MAX_DIMS:
        raise CorruptBucketError(f"{where}: header field 'shape' must be a list of at most {MAX_DIMS} sizes, got {v!r}"[:300])
    numel = 1
    for d in v:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise CorruptBucketError(f"{where}: header field 'shape' holds {d!r}, expected non-negative integers"[:300])
        numel *= d
        if numel > MAX_ELEMS:
            raise LimitError(f"{where}: header field 'shape' {v} declares more than {MAX_ELEMS} elements"[:300])
    return tuple(v), numel


def _tensor_ref(h, where: str) -> dict:
    """A manifest item's `base` or a `removed` item: {dtype, shape, xxh}, checked."""
    info = _dtype(h, where)
    shape, _ = _shape(h, where)
    return {"dtype": info.name, "shape": list(shape), "xxh": _str(h, "xxh", where, pattern=_HEX16)}


# ---------------------------------------------------------------- plan


def plan_payload(buckets, max_bytes: int | None = None,
                 max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[list[Bucket], PayloadPlan]:
    """Parse and check every header of a payload (see the module docstring). Allocates nothing
    that the headers declare. Raises SyncError subclasses only."""
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if not isinstance(buckets, (list, tuple)) or not buckets:
        raise NotADeltaError("payload has no buckets")
    parsed = [parse_bucket(b, i, max_header_bytes) for i, b in enumerate(buckets)]
    h0 = parsed[0].header
    payload = _str(h0, "payload", "bucket 0", pattern=_HEX16)
    base = None if _field(h0, "base", "bucket 0") is None else _version(h0, "base", "bucket 0")
    target = _version(h0, "target", "bucket 0")
    level = _str(h0, "level", "bucket 0", choices=CODEC_LEVELS)
    if base is not None and target <= base:
        raise CorruptBucketError(f"bucket 0: header field 'target' is {target}, not greater than 'base' {base}")
    for i, b in enumerate(parsed):
        h, where = b.header, f"bucket at position {i}"
        if _field(h, "payload", where) != payload:
            raise CorruptBucketError(f"{where} belongs to payload {h['payload']!r}, not {payload!r} (buckets of different payloads mixed)"[:300])
        for key, want in (("base", base), ("target", target), ("level", level)):
            have = _field(h, key, where)
            if have != want or type(have) is not type(want):
                raise CorruptBucketError(f"{where}: header field {key!r} is {have!r}, bucket 0's is {want!r}"[:300])
        if _int(h, "count", where, 1) != len(parsed):
            raise CorruptBucketError(f"{where}: header field 'count' says {h['count']} buckets, {len(parsed)} were given (dropped or duplicated bucket)")
        if _int(h, "index", where) != i:
            raise CorruptBucketError(f"{where}: header field 'index' is {h['index']} (buckets reordered, dropped or duplicated)")
        if (i == 0) != ("manifest" in h) or (i != 0 and ("removed" in h or "metadata" in h)):
            raise CorruptBucketError(f"{where}: the manifest, removed and metadata must be in bucket 0 and only there")
        _list(h, "entries", where)

    tensors: dict[str, TensorSpec] = {}
    for j, m in enumerate(_list(h0, "manifest", "bucket 0")):
        where = f"bucket 0 manifest item {j}"
        name = _name(m, where)
        where = f"bucket 0 manifest item {j} ({name!r})"
        if name in tensors:
            raise CorruptBucketError(f"{where}: tensor listed twice")
        info = _dtype(m, where)
        shape, numel = _shape(m, where)
        kind = _str(m, "kind", where, choices=("delta", "whole"))
        ref = _field(m, "base", where)
        ref = None if ref is None else _tensor_ref(ref, f"{where} base")
        if base is None and (ref is not None or kind != "whole"):
            raise CorruptBucketError(f"{where}: a snapshot holds only whole tensors without a base")
        if kind == "delta" and (ref is None or ref["dtype"] != info.name or tuple(ref["shape"]) != shape):
            raise CorruptBucketError(f"{where}: a delta tensor's dtype and shape ({info.name}{list(shape)}) must equal "
                                     f"its base's ({None if ref is None else ref['dtype']}{None if ref is None else ref['shape']})")
        tensors[name] = TensorSpec(name, info, shape, numel, kind, _str(m, "xxh", where, pattern=_HEX16), ref)
    removed: dict[str, dict] = {}
    for j, r in enumerate(_list(h0, "removed", "bucket 0")):
        where = f"bucket 0 removed item {j}"
        name = _name(r, where)
        if name in tensors or name in removed:
            raise CorruptBucketError(f"{where}: tensor {name!r} is also in the manifest or removed twice"[:300])
        removed[name] = _tensor_ref(r, f"{where} ({name!r})")
    if base is None and removed:
        raise CorruptBucketError("bucket 0: a snapshot must not name removed tensors")
    metadata = h0.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptBucketError("bucket 0: header field 'metadata' must map strings to strings")
    new_bytes = sum(t.numel * t.info.width // 8 for t in tensors.values() if t.kind == "whole")
    if new_bytes > max_bytes:
        biggest = max((t for t in tensors.values() if t.kind == "whole"), key=lambda t: t.numel)
        raise LimitError(f"bucket 0 manifest: the payload creates {new_bytes} bytes of tensors (largest {biggest.name!r} "
                         f"{biggest.info.name}{list(biggest.shape)}), over the limit of {max_bytes} bytes "
                         "(max_bytes; python -m sync apply --max-bytes)"[:400])

    next_start = {name: 0 for name in tensors}
    empty_seen: set[str] = set()
    plans = []
    for bi, b in enumerate(parsed):
        out = []
        for ei, e in enumerate(b.header["entries"]):
            out.append(_plan_entry(e, bi, ei, len(b.body), tensors, next_start, empty_seen))
        plans.append(out)
    for name, t in tensors.items():
        if next_start[name] != t.numel or (t.numel == 0 and name not in empty_seen):
            raise CorruptBucketError(f"tensor {name!r}: entries cover elements [0, {next_start[name]}) of {t.numel} (missing bucket?)")
    plan = PayloadPlan(payload, base, target, level, tensors, removed, plans, dict(metadata),
                       sum(b.nbytes for b in parsed), new_bytes)
    return parsed, plan


def _plan_entry(e, bi: int, ei: int, body_len: int, tensors: dict, next_start: dict, empty_seen: set) -> EntrySpec:
    where = f"bucket {bi} entry {ei}"
    name = _str(e, "name", where)
    if name not in tensors:
        raise CorruptBucketError(f"{where}: tensor {name!r} is not in the manifest"[:300])
    t = tensors[name]
    where = f"bucket {bi} entry {ei} ({name!r})"
    if _field(e, "dtype", where) != t.info.name or _field(e, "shape", where) != list(t.shape) or _field(e, "kind", where) != t.kind:
        raise CorruptBucketError(f"{where}: header fields 'dtype', 'shape', 'kind' differ from the manifest's")
    start, stop = _int(e, "start", where), _int(e, "stop", where)
    if start != next_start[name] or stop > t.numel or stop - start > MAX_CHUNK_ELEMS or \
            (stop <= start and not (t.numel == 0 and stop == start == 0 and name not in empty_seen)):
        raise CorruptBucketError(f"{where}: element range [{start}, {stop}) is out of order, out of bounds (tensor has "
                                 f"{t.numel}) or longer than {MAX_CHUNK_ELEMS}")
    next_start[name] = stop
    if t.numel == 0:
        empty_seen.add(name)
    count = stop - start
    enc = _str(e, "enc", where, choices=DENSE_ENCODINGS if t.kind == "whole" else DELTA_ENCODINGS + DENSE_ENCODINGS)
    changed = _int(e, "changed", where, 0, count)
    off, length = _int(e, "off", where, 0, body_len), _int(e, "len", where, 0, body_len)
    if off + length > body_len:
        raise CorruptBucketError(f"{where}: body slice [{off}, {off + length}) outside a body of {body_len} bytes")
    if t.kind == "whole" and changed != count:
        raise CorruptBucketError(f"{where}: header field 'changed' is {changed}, a whole range has {count}")
    if enc == "none" and (length or changed):
        raise CorruptBucketError(f"{where}: a 'none' entry with a body or changes")
    if enc in ("gap", "ctx", "mask", "gap8") and changed < 1:
        raise CorruptBucketError(f"{where}: a {enc!r} entry with 0 changes")
    if enc == "raw" and length != count * t.info.width // 8:
        raise CorruptBucketError(f"{where}: raw body has {length} bytes, {count} {t.info.name} elements need {count * t.info.width // 8}")
    return EntrySpec(name, start, stop, enc, changed, off, length, _str(e, "xxh", where, pattern=_HEX16), where)
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


# ---------------------------------------------------------------- decode


def decode_into(
    state: dict[str, torch.Tensor], version: int | None, buckets: list, *, in_place: bool,
    max_bytes: int | None = None,
) -> DecodedPayload:
    """Decode and verify a payload against `state`. With in_place=False, changed tensors are
    copied first (state untouched). With in_place=True the CPU tensors of `state` are edited
    directly and every edit is logged in `undo`; on any error the edits are rolled back before
    the error propagates. `max_bytes` bounds the tensors the payload creates (default
    DEFAULT_MAX_BYTES); a delta's other tensors are bounded by `state`'s. Raises SyncError
    subclasses only."""
    parsed, plan = plan_payload(buckets, max_bytes)
    result = None
    try:
        result = _decode_checked(state, version, parsed, plan, in_place)
        return result
    except SyncError:
        if result is not None:
            result.rollback()
        raise
    except MemoryError:
        raise LimitError(f"out of memory decoding a payload that creates {plan.new_bytes} bytes of tensors "
                         "(lower max_bytes / --max-bytes, or give the process more memory)") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise CorruptBucketError(f"malformed payload: {type(e).__name__}: {e}") from None


def _decode_checked(state, version, parsed, plan: PayloadPlan, in_place) -> DecodedPayload:
    base, target = plan.base, plan.target
    if base is not None and (not isinstance(version, int) or isinstance(version, bool) or version != base):
        raise VersionMismatchError(f"payload is a delta {base} -> {target}; it needs a receiver at version {base}, this one is at {version!r}")
    if not isinstance(state, dict):
        raise TensorMismatchError(f"receiver state must be a dict of tensors, got {type(state).__name__}")
    # The base the sender diffed against must be exactly what the receiver holds.
    expected_base = {name: t.base for name, t in plan.tensors.items() if t.base is not None}
    expected_base.update(plan.removed)
    base_xxh = {}
    if base is not None:
        missing = sorted(set(expected_base) - set(state))
        extra = sorted(set(state) - set(expected_base))
        if missing or extra:
            raise TensorMismatchError(
                f"receiver state does not match the delta's base: missing {missing[:5]}, unexpected {extra[:5]}"[:400]
            )
        for name, b in expected_base.items():
            t = state[name]
            info = info_for(t.dtype, name)
            if info.name != b["dtype"] or list(t.shape) != b["shape"]:
                raise TensorMismatchError(
                    f"tensor {name!r}: receiver has {info.name}{list(t.shape)}, the delta's base is {b['dtype']}{b['shape']}"
                )
            h = digest(bits_of(t))
            if h != b["xxh"]:
                raise TensorMismatchError(f"tensor {name!r}: receiver's values differ from the delta's base (checksum {h} != {b['xxh']})")
            base_xxh[name] = h
    out = DecodedPayload(
        base_version=base, target_version=target, level=plan.level, order=list(plan.tensors),
        meta={name: (t.info, t.shape) for name, t in plan.tensors.items()},
        arrays={}, whole=set(), removed=list(plan.removed), payload_bytes=plan.payload_bytes,
    )
    try:
        _decode_entries(state, parsed, plan, out, in_place)
        for name, t in plan.tensors.items():
            result_xxh = digest(out.arrays[name]) if name in out.arrays else base_xxh.get(name)
            if result_xxh != t.xxh:
                raise CorruptBucketError(f"tensor {name!r}: decoded result checksum {result_xxh} != sender's {t.xxh}")
    except BaseException:
        out.rollback()
        raise
    return out


def _decode_entries(state, parsed, plan: PayloadPlan, out: DecodedPayload, in_place: bool) -> None:
    pool = ThreadPoolExecutor(workers()) if workers() > 1 else None
    try:
        for b, entries in zip(parsed, plan.entries):
            # 1) set up every entry of the bucket, 2) decode their streams (in parallel: the
            # kernels release the GIL and only read the base), 3) write and verify in order.
            tasks = [_entry_task(state, b.body, e, plan.tensors[e.name], out, in_place) for e in entries]
            work = [t for t in tasks if t["decode"] is not None]
            total = sum(t["spec"].stop - t["spec"].start for t in work)
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


def _entry_task(state, body, e: EntrySpec, spec: TensorSpec, out: DecodedPayload, in_place: bool) -> dict:
    info, name, start, stop, enc, where = spec.info, e.name, e.start, e.stop, e.enc, e.where
    chunk = body[e.off : e.off + e.length]
    changed = e.changed
    out.dense_bytes += (stop - start) * info.width // 8
    task: dict[str, Any] = {"spec": e, "decode": None, "whole": spec.kind == "whole"}
    if task["whole"]:
        arr = out.arrays.get(name)
        if arr is None:
            arr = out.arrays[name] = np.empty(spec.numel, info.uint)
            out.whole.add(name)
        task["decode"] = lambda: decode_dense_chunk(enc, chunk, stop - start, info, where)
    else:
        src = bits_of(state[name])
        arr = out.arrays.get(name)
        if arr is None:
            arr = src
            if in_place:
                if enc != "none" and arr.ctypes.data != state[name].data_ptr():
                    raise TensorMismatchError(f"tensor {name!r}: in-place decoding needs CPU contiguous tensors")
            elif enc != "none":
                # a fresh array that the entries fill range by range (the decode tasks do it in
                # parallel) rather than one serial copy of the whole tensor first
                arr = np.empty_like(src)
                arr[:start] = src[:start]
            if enc != "none":
                out.arrays[name] = arr
        elif not in_place and enc == "none":
            arr[start:stop] = src[start:stop]
        if enc == "mask":
            # decoded straight into the result range: no temporary, no extra copy
            old, dst = src[start:stop], arr[start:stop]
            if in_place:
                # the task itself copies and logs the undo before it writes (in parallel, and
                # a task that never runs logs nothing)
                def decode_logged(arr=arr, old=old, dst=dst, chunk=chunk, changed=changed, where=where, start=start, stop=stop):
                    out.undo.append((arr, slice(start, stop), old.copy()))
                    decode_mask_chunk(chunk, changed, old, info, where, dst)

                task["decode"] = decode_logged
            else:
                task["decode"] = lambda: decode_mask_chunk(chunk, changed, old, info, where, dst)
        elif enc in ("gap", "ctx", "gap8"):
            base, dst = src[start:stop], arr[start:stop]
            if in_place or dst is base:
                task["decode"] = lambda: decode_delta_chunk(enc, chunk, changed, base, info, where)
            else:  # fresh result array: the unchanged elements come from the base
                def copy_then_decode(dst=dst, base=base, enc=enc, chunk=chunk, changed=changed, where=where):
                    np.copyto(dst, base)
                    return decode_delta_chunk(enc, chunk, changed, base, info, where)

                task["decode"] = copy_then_decode
        elif enc in DENSE_ENCODINGS:
            task["decode"] = lambda: decode_dense_chunk(enc, chunk, stop - start, info, where)
    task["arr"] = arr
    return task


def _write_entry(t: dict, out: DecodedPayload, in_place: bool) -> None:
    e: EntrySpec = t["spec"]
    arr, start, stop, name = t["arr"], e.start, e.stop, e.name
    if t["whole"]:
        arr[start:stop] = t["result"]
    elif e.enc in ("gap", "ctx", "gap8"):
        pos, vals = t["result"]
        pos += start
        if in_place:
            out.undo.append((arr, pos, arr[pos]))
        arr[pos] = vals
        out.ops.append((name, "scatter", pos, vals))
        out.changed += e.changed
    elif e.enc == "mask":  # already decoded in place
        out.ops.append((name, "range", start, arr[start:stop]))
        out.changed += e.changed
    elif e.enc in DENSE_ENCODINGS:
        vals = t["result"]
        if in_place:
            out.undo.append((arr, slice(start, stop), arr[start:stop].copy()))
        arr[start:stop] = vals
        out.ops.append((name, "range", start, vals))
        out.changed += e.changed
    if digest(arr[start:stop]) != e.xxh:
        raise CorruptBucketError(f"{e.where}: decoded elements [{start}, {stop}) do not match the sender's checksum")


def apply(
    state: dict[str, torch.Tensor], version: int | None, buckets: list[bytes], *, max_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Apply a payload to `state` (never mutated). Returns (new_state, new_version).
    Tensors the payload leaves unchanged are shared with `state`, not copied."""
    res = decode_into(state, version, buckets, in_place=False, max_bytes=max_bytes)
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


def inspect_payload(buckets: list, *, max_bytes: int | None = None) -> dict:
    """Describe a payload without applying it (checks every header field, the bucket
    checksums and the limits, not the decoded values)."""
    parsed, plan = plan_payload(buckets, max_bytes)
    tensors = {
        name: {"dtype": t.info.name, "shape": list(t.shape), "kind": t.kind, "numel": t.numel, "changed": 0,
               "payload_bytes": 0, "dense_bytes": t.numel * t.info.width // 8, "encodings": []}
        for name, t in plan.tensors.items()
    }
    for entries in plan.entries:
        for e in entries:
            t = tensors[e.name]
            t["changed"] += e.changed
            t["payload_bytes"] += e.length
            if e.enc not in t["encodings"]:
                t["encodings"].append(e.enc)
    dense = sum(t["dense_bytes"] for t in tensors.values())
    return {
        "base_version": plan.base, "target_version": plan.target, "level": plan.level,
        "kind": "snapshot" if plan.base is None else "delta", "buckets": len(parsed),
        "payload_bytes": plan.payload_bytes, "dense_bytes": dense, "ratio": dense / max(1, plan.payload_bytes),
        "changed": sum(t["changed"] for t in tensors.values() if t["kind"] == "delta"),
        "new_bytes": plan.new_bytes, "tensors": tensors, "removed": list(plan.removed), "metadata": plan.metadata,
    }


# ---------------------------------------------------------------- chunk decoders


def decode_dense_chunk(enc: str, body: memoryview, count: int, info: DtypeInfo, where: str) -> np.ndarray:
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


def decode_mask_chunk(body: memoryview, changed: int, old: np.ndarray, info: DtypeInfo, where: str, dst: np.ndarray) -> None:
    """New bit patterns of the whole chunk from a "mask" body (see FORMAT.md), into `dst`
    (which may be `old` itself: the kernel reads each element before writing it)."""
    from sync import delta_kernels as K  # numba: loaded when a payload gets this far, not to reject one

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
    work, vals = scratch("d", ng * 8, np.uint8), scratch("vals", changed + 1, np.uint8)
    if K.decode_mask(old, data, changed, info.width, kernel_params(info)[-1], dst, work, vals) != 0:
        raise CorruptBucketError(f"{where}: mask stream is corrupt (change masks and values disagree)")


def decode_delta_chunk(enc: str, body: memoryview, changed: int, old: np.ndarray, info: DtypeInfo, where: str):
    """Positions (relative to the chunk) and new bit patterns of the changed elements."""
    from sync import delta_kernels as K
    if changed < 1 or changed > old.shape[0]:
        raise CorruptBucketError(f"{where}: {changed} changes in a chunk of {old.shape[0]} elements")
    buf = np.frombuffer(body, dtype=np.uint8)
    pos = np.empty(changed, np.int64)
    vals: np.ndarray = np.empty(changed, info.uint)
    params = kernel_params(info)
    if enc == "gap8":
        ga, va = _gap8_frames(buf, changed, info.width // 8, where)
        status = K.decode_gap8(old, ga, va, changed, info.width // 8, params[-1], pos, vals)
    elif enc == "gap":
        n1 = struct.unpack_from("<I", buf, 0)[0] if len(buf) >= 4 else -1  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12
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


def _gap8_frames(buf: np.ndarray, changed: int, wb: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The two decompressed streams of a "gap8" body, their sizes checked against the change
    count (and the escapes the bytes announce) before and after decompressing."""
    if len(buf) < 4:
        raise CorruptBucketError(f"{where}: gap8 body of {len(buf)} bytes has no frame length")
    la = struct.unpack_from("<I", buf, 0)[0]  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12
    if 4 + la > len(buf):
        raise CorruptBucketError(f"{where}: gap8 frame length {la} does not fit a body of {len(buf)} bytes")
    out = []
    for frame, esc_bytes, what in ((buf[4 : 4 + la], 4, "gap"), (buf[4 + la :], wb, "value")):
        try:
            size = zstandard.frame_content_size(frame)  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12
            if size < changed or size > changed * (1 + esc_bytes) or (size - changed) % esc_bytes:
                raise CorruptBucketError(f"{where}: gap8 {what} frame holds {size} bytes, expected {changed} "
                                         f"+ a multiple of {esc_bytes} up to {changed * (1 + esc_bytes)}")
            data = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame), np.uint8)  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12
        except zstandard.ZstdError as e:
            raise CorruptBucketError(f"{where}: gap8 {what} frame is corrupt ({e})") from None
        if data.shape[0] != size:
            raise CorruptBucketError(f"{where}: gap8 {what} frame decompressed to {data.shape[0]} bytes, its frame says {size}")
        if int(np.count_nonzero(data[:changed] == 255)) != (size - changed) // esc_bytes:
            raise CorruptBucketError(f"{where}: gap8 {what} frame announces a different number of escapes than it holds")
        out.append(data)
    return out[0], out[1]
