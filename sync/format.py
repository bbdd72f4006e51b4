"""Wire format: self-describing buckets and the DELTA file container (byte layout in FORMAT.md).

A bucket is   magic "SPDB" | u16 format version | u16 flags | u32 header length |
              u64 body length | header (zstd-compressed UTF-8 JSON) | body |
              u64 xxh3_64 of all bytes before it
A file is     magic "SPDL" | u16 container version | u16 flags | u32 bucket count |
              (u64 bucket length | bucket bytes) * count
All integers are little-endian. This module packs, unpacks and checks structure and
checksums, and holds the format's limits; what the entries mean is encoder.py's and
decoder.py's job.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import xxhash
import zstandard

from sync.errors import CorruptBucketError, LimitError, NotADeltaError

BUCKET_MAGIC = b"SPDB"
FILE_MAGIC = b"SPDL"
FORMAT_VERSION = 1
CONTAINER_VERSION = 1
_BUCKET_HEAD = struct.Struct("<4sHHIQ")  # magic, version, flags, header_len, body_len
_FILE_HEAD = struct.Struct("<4sHHI")  # magic, version, flags, count
_U64 = struct.Struct("<Q")
CHECKSUM_BYTES = 8


def digest(data) -> str:
    """xxh3_64 of a bytes-like object or a contiguous numpy array, as 16 hex digits."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8)
    return xxhash.xxh3_64_hexdigest(data)


@dataclass
class Bucket:
    header: dict
    body: memoryview
    nbytes: int


HEADER_ZSTD_LEVEL = 6  # their JSON (names, hex checksums) shrinks 2-4x; level 19 took ~18 ms a bucket for ~5 % less
# Limits a reader checks before it allocates or decompresses anything a header declares.
MAX_HEADER_BYTES = 32 << 20  # decompressed JSON; ~150 bytes per tensor entry: 100k+ tensors fit
MAX_JSON_DEPTH = 8  # the format nests 5 levels (header, manifest, tensor, base, shape)
MAX_CHUNK_ELEMS = 1 << 22  # elements per entry: bounds decoder memory per work unit
MAX_DIMS = 32  # dimensions of a tensor's shape
MAX_NAME_CHARS = 4096
MAX_VERSION = 2**53 - 1  # versions are JSON integers that every JSON reader holds exactly
RESERVED_NAMES = frozenset({"__metadata__"})  # safetensors keeps its header under this key
DELTA_ENCODINGS = ("none", "gap", "ctx", "mask", "gap8")
DENSE_ENCODINGS = ("planes", "raw")


def pack_bucket(header: dict, body) -> bytes:
    """One bucket: `body` is bytes-like, or a list of bytes-like pieces laid end to end. The
    checksum is computed piece by piece and the bucket is joined once (a full send's raw body
    would otherwise be copied three times more)."""
    pieces = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
    body_len = sum(memoryview(p).nbytes for p in pieces)
    head_json = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head_bytes = zstandard.ZstdCompressor(level=HEADER_ZSTD_LEVEL).compress(head_json)
    prefix = _BUCKET_HEAD.pack(BUCKET_MAGIC, FORMAT_VERSION, 0, len(head_bytes), body_len)
    h = xxhash.xxh3_64()
    for p in (prefix, head_bytes, *pieces):
        h.update(p)
    return b"".join((prefix, head_bytes, *pieces, _U64.pack(h.intdigest())))


def parse_bucket(data, position: int, max_header_bytes: int = MAX_HEADER_BYTES) -> Bucket:
    """Check magic, version, lengths and checksum; parse the JSON header (at most
    `max_header_bytes` decompressed, nested at most MAX_JSON_DEPTH deep)."""
    where = f"bucket at position {position}"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise NotADeltaError(f"{where}: expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(view) < _BUCKET_HEAD.size + CHECKSUM_BYTES:
        if bytes(view[:4]) != BUCKET_MAGIC[: len(view[:4])] or len(view) < 4:
            raise NotADeltaError(f"{where}: {len(view)} bytes is not a sync bucket")
        raise CorruptBucketError(f"{where}: truncated to {len(view)} bytes")
    magic, version, flags, head_len, body_len = _BUCKET_HEAD.unpack_from(view, 0)
    if magic != BUCKET_MAGIC:
        raise NotADeltaError(f"{where}: magic {magic!r} is not the sync bucket magic {BUCKET_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptBucketError(f"{where}: format version {version}, this reader knows {FORMAT_VERSION}")
    if flags != 0:
        raise CorruptBucketError(f"{where}: unknown flags {flags:#x}")
    expected = _BUCKET_HEAD.size + head_len + body_len + CHECKSUM_BYTES
    if len(view) != expected:
        raise CorruptBucketError(f"{where}: {len(view)} bytes, its lengths say {expected} (truncated or padded)")
    (stored,) = _U64.unpack_from(view, expected - CHECKSUM_BYTES)
    actual = xxhash.xxh3_64_intdigest(view[: expected - CHECKSUM_BYTES])
    if stored != actual:
        raise CorruptBucketError(f"{where}: checksum mismatch (stored {stored:016x}, computed {actual:016x})")
    start = _BUCKET_HEAD.size
    if head_len > max_header_bytes:
        raise LimitError(f"{where}: header field 'header length' is {head_len} bytes, over the limit of {max_header_bytes}")
    packed = bytes(view[start : start + head_len])
    try:
        size = zstandard.frame_content_size(packed)
    except zstandard.ZstdError as e:
        raise CorruptBucketError(f"{where}: header is not a zstd frame ({e})") from None
    if size < 0:
        raise CorruptBucketError(f"{where}: header frame does not declare its content size")
    if size > max_header_bytes:
        raise LimitError(f"{where}: header declares {size} bytes of JSON, over the limit of {max_header_bytes}")
    try:
        text = zstandard.ZstdDecompressor().decompress(packed, max_output_size=size)
        if len(text) != size:
            raise ValueError(f"header decompressed to {len(text)} bytes, its frame says {size}")
        header = json.loads(text.decode())
    except RecursionError:
        raise CorruptBucketError(f"{where}: header JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError, zstandard.ZstdError) as e:
        raise CorruptBucketError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptBucketError(f"{where}: header is not a JSON object")
    if json_depth(header) > MAX_JSON_DEPTH:
        raise CorruptBucketError(f"{where}: header JSON nests deeper than {MAX_JSON_DEPTH} levels")
    body = view[start + head_len : start + head_len + body_len]
    return Bucket(header=header, body=body, nbytes=len(view))


def json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d + 1)
        if d + 1 > MAX_JSON_DEPTH:
            return d + 1
        stack.extend((c, d + 1) for c in v if isinstance(c, (dict, list)))
    return deepest


def pack_container(buckets: list[bytes]) -> bytes:
    parts = [_FILE_HEAD.pack(FILE_MAGIC, CONTAINER_VERSION, 0, len(buckets))]
    for b in buckets:
        parts.append(_U64.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def parse_container(data, what: str = "file") -> list:
    """Split a DELTA file into its buckets (each still to be checked by parse_bucket). The
    buckets are views into `data`, not copies."""
    view = memoryview(data)
    if len(view) < _FILE_HEAD.size or bytes(view[:4]) != FILE_MAGIC:
        raise NotADeltaError(f"{what}: not a sync delta file (expected magic {FILE_MAGIC!r})")
    magic, version, flags, count = _FILE_HEAD.unpack_from(view, 0)
    if version != CONTAINER_VERSION or flags != 0:
        raise CorruptBucketError(f"{what}: container version {version} flags {flags:#x}, expected {CONTAINER_VERSION} and 0")
    pos = _FILE_HEAD.size
    if count == 0 or count * (8 + _BUCKET_HEAD.size + CHECKSUM_BYTES) > len(view) - pos:
        raise CorruptBucketError(f"{what}: header field 'bucket count' is {count}; {len(view) - pos} bytes cannot hold that many buckets")
    out = []
    for i in range(count):
        if pos + 8 > len(view):
            raise CorruptBucketError(f"{what}: truncated before bucket {i} of {count}")
        (n,) = _U64.unpack_from(view, pos)
        pos += 8
        if n > len(view) - pos:
            raise CorruptBucketError(f"{what}: bucket {i} of {count} truncated ({len(view) - pos} of {n} bytes)")
        out.append(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise CorruptBucketError(f"{what}: {len(view) - pos} unexpected bytes after the last bucket")
    return out
