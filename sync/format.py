"""Wire format: self-describing buckets and the DELTA file container (byte layout in FORMAT.md).

A bucket is   magic "SPDB" | u16 format version | u16 flags | u32 header length |
              u64 body length | header (zstd-compressed UTF-8 JSON) | body |
              u64 xxh3_64 of all bytes before it
A file is     magic "SPDL" | u16 container version | u16 flags | u32 bucket count |
              (u64 bucket length | bucket bytes) * count
All integers are little-endian. This module only packs, unpacks and checks structure and
checksums; what the entries mean is codec.py's job.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import xxhash
import zstandard

from sync.errors import CorruptBucketError, NotADeltaError

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


HEADER_ZSTD_LEVEL = 19  # headers are small; their JSON (names, hex checksums) shrinks 2-4x
MAX_HEADER_BYTES = 1 << 28


def pack_bucket(header: dict, body: bytes) -> bytes:
    head_json = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head_bytes = zstandard.ZstdCompressor(level=HEADER_ZSTD_LEVEL).compress(head_json)
    prefix = _BUCKET_HEAD.pack(BUCKET_MAGIC, FORMAT_VERSION, 0, len(head_bytes), len(body))
    data = b"".join((prefix, head_bytes, body))
    return data + _U64.pack(xxhash.xxh3_64_intdigest(data))


def parse_bucket(data, position: int) -> Bucket:
    """Check magic, version, lengths and checksum; parse the JSON header."""
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
    try:
        packed = bytes(view[start : start + head_len])
        size = zstandard.frame_content_size(packed)
        if size < 0 or size > MAX_HEADER_BYTES:
            raise ValueError(f"header frame declares {size} bytes")
        header = json.loads(zstandard.ZstdDecompressor().decompress(packed).decode())
    except (UnicodeDecodeError, ValueError, zstandard.ZstdError) as e:
        raise CorruptBucketError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptBucketError(f"{where}: header is not a JSON object")
    body = view[start + head_len : start + head_len + body_len]
    return Bucket(header=header, body=body, nbytes=len(view))


def pack_container(buckets: list[bytes]) -> bytes:
    parts = [_FILE_HEAD.pack(FILE_MAGIC, CONTAINER_VERSION, 0, len(buckets))]
    for b in buckets:
        parts.append(_U64.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def parse_container(data: bytes, what: str = "file") -> list[bytes]:
    """Split a DELTA file into its buckets (each still to be checked by parse_bucket)."""
    if len(data) < _FILE_HEAD.size or data[:4] != FILE_MAGIC:
        raise NotADeltaError(f"{what}: not a sync delta file (expected magic {FILE_MAGIC!r})")
    magic, version, flags, count = _FILE_HEAD.unpack_from(data, 0)
    if version != CONTAINER_VERSION or flags != 0:
        raise CorruptBucketError(f"{what}: container version {version} flags {flags:#x}, expected {CONTAINER_VERSION} and 0")
    pos = _FILE_HEAD.size
    out = []
    for i in range(count):
        if pos + 8 > len(data):
            raise CorruptBucketError(f"{what}: truncated before bucket {i} of {count}")
        (n,) = _U64.unpack_from(data, pos)
        pos += 8
        if pos + n > len(data):
            raise CorruptBucketError(f"{what}: bucket {i} of {count} truncated ({len(data) - pos} of {n} bytes)")
        out.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise CorruptBucketError(f"{what}: {len(data) - pos} unexpected bytes after the last bucket")
    return out
