"""Command line: ship and inspect weight deltas between safetensors checkpoints.

    python -m sync encode BASE NEW -o DELTA [--fast]          # best compression unless --fast
    python -m sync apply BASE DELTA -o OUT [--max-bytes N]    # OUT == NEW, bit for bit
    python -m sync inspect DELTA [--json] [--max-bytes N]     # versions, tensors, changes, sizes, ratio

A DELTA file is the payload's buckets in a small container (FORMAT.md). Reading one is bounded:
the file, and the tensors a payload creates, may be at most --max-bytes (default: 8 GiB, or a
quarter of the process's address-space limit when that is lower); every header field is checked
before anything it declares is allocated. Outputs are written to a temporary file, read back and
verified, then renamed: a failed command leaves no output. Bad input gives one line
`error: <ErrorType>: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
import uuid
from pathlib import Path

from sync.errors import BadInputError, LimitError, SyncError

DEFAULT_MAX_BYTES = 8 << 30
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8G', '512MiB', '1000000' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 8G, 512M, 1000000)")
    unit = (m.group(2) or "b")[0].lower()
    return int(m.group(1)) << {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


def default_max_bytes() -> int:
    """8 GiB, or a quarter of RLIMIT_AS when that is lower (decoding holds the payload, its
    output, the base and a read-back tensor at once)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return DEFAULT_MAX_BYTES
    return min(DEFAULT_MAX_BYTES, soft // 4)


def _load_state(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BadInputError(f"{path}: not a readable safetensors file ({e})") from None
    return state, meta


def _read_delta(path: str, max_bytes: int) -> list:
    from sync.format import parse_container

    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise LimitError(f"{path}: the file has {size} bytes, over the limit of {max_bytes} (--max-bytes)")
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e})") from None
    return parse_container(data, what=path)


def _write_verified(path: str, state: dict, metadata: dict | None, expected: dict | None = None) -> None:
    """Write `state` as safetensors next to `path`, read it back and compare every tensor (and
    the checksums in `expected`, name -> xxh3 of the bits), then rename it into place. On any
    failure nothing is left at `path` (an existing file there is left as it was)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(path)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata or None)
        except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
            raise BadInputError(f"{path}: cannot be written as safetensors ({e})") from None
        _read_back(str(tmp), path, state, metadata, expected or {})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an output file gets the usual mode
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8", "uint8": "U8",
              "bool": "BOOL", "int16": "I16", "int32": "I32", "int64": "I64", "float8_e4m3fn": "F8_E4M3",
              "float8_e5m2": "F8_E5M2"}


def _read_back(tmp: str, path: str, state: dict, metadata: dict | None, expected: dict) -> None:
    """The safetensors file at `tmp` holds exactly `state` and `metadata`: its header is parsed
    and every tensor's bytes are hashed from the file in 8 MiB reads (no mmap, no second copy
    of the weights), then compared with `expected` (name -> xxh3 of the bits) or the tensor's."""
    import struct

    import xxhash

    from sync.dtypes import bits_of, info_for
    from sync.format import digest

    try:
        with open(tmp, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            start = 8 + n
            meta = header.pop("__metadata__", None) or {}
            if sorted(header) != sorted(state) or meta != (metadata or {}):
                raise BadInputError(f"{path}: the file read back holds other tensors or metadata than were written")
            for name, t in state.items():
                h, info = header[name], info_for(t.dtype, name)
                begin, end = h["data_offsets"]
                if h["dtype"] != _ST_DTYPES[info.name] or h["shape"] != list(t.shape) or \
                        end - begin != t.numel() * info.width // 8:
                    raise BadInputError(f"{path}: tensor {name!r} read back has {h['dtype']}{h['shape']}, "
                                        f"{info.name}{list(t.shape)} was written")
                f.seek(start + begin)
                x, left = xxhash.xxh3_64(), end - begin
                while left:
                    chunk = f.read(min(left, 8 << 20))
                    if not chunk:
                        raise BadInputError(f"{path}: the file read back is truncated in tensor {name!r}")
                    x.update(chunk)
                    left -= len(chunk)
                if x.hexdigest() != (expected.get(name) or digest(bits_of(t))):
                    raise BadInputError(f"{path}: tensor {name!r} read back differs from what was written")
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise BadInputError(f"{path}: the file written cannot be read back ({type(e).__name__}: {e})") from None


def _cmd_encode(args) -> int:
    from sync.decoder import inspect_payload
    from sync.encoder import encode
    from sync.format import pack_container

    _check_output(args.output)
    base, _ = _load_state(args.base)
    new, meta = _load_state(args.new)
    t0 = time.perf_counter()
    try:
        buckets = encode(base, new, base_version=args.base_version, target_version=args.target_version,
                         level="fast" if args.fast else "best", bucket_bytes=args.bucket_mb << 20, metadata=meta)
    except (ValueError, TypeError) as e:
        raise BadInputError(str(e)) from None
    dt = time.perf_counter() - t0
    data = pack_container(buckets)
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        info = inspect_payload(_read_delta(str(tmp), max(len(data), DEFAULT_MAX_BYTES)), max_bytes=1 << 62)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.output}: {len(data)} bytes, {info['buckets']} bucket(s), {info['changed']} changed elements, "
          f"ratio {info['ratio']:.1f}x vs dense {info['dense_bytes']} bytes, encoded in {dt:.2f}s")
    return 0


def _check_output(path: str) -> None:
    out = Path(path)
    if out.is_dir() or not out.parent.is_dir():
        raise BadInputError(f"{path}: is a directory" if out.is_dir() else f"{path}: directory {out.parent} does not exist")


def _cmd_apply(args) -> int:
    from sync.decoder import apply, plan_payload

    _check_output(args.output)
    max_bytes = args.max_bytes if args.max_bytes is not None else default_max_bytes()
    buckets = _read_delta(args.delta, max_bytes)
    _, plan = plan_payload(buckets, max_bytes)  # every header field and limit, before the base is read
    if plan.base is None:
        base, version = {}, None  # a snapshot needs no base
    else:
        base, _ = _load_state(args.base)
        version = plan.base
    new, _ = apply(base, version, buckets, max_bytes=max_bytes)
    _write_verified(args.output, new, plan.metadata, {name: t.xxh for name, t in plan.tensors.items()})
    print(f"wrote {args.output}: version {plan.target}, {len(new)} tensors, verified")
    return 0


def _cmd_inspect(args) -> int:
    from sync.decoder import inspect_payload

    max_bytes = args.max_bytes if args.max_bytes is not None else default_max_bytes()
    info = inspect_payload(_read_delta(args.delta, max_bytes), max_bytes=max_bytes)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    base = "none (snapshot)" if info["base_version"] is None else info["base_version"]
    print(f"{args.delta}: {info['kind']} {base} -> {info['target_version']}, level {info['level']}, {info['buckets']} bucket(s)")
    print(f"payload {info['payload_bytes']} bytes, dense {info['dense_bytes']} bytes, ratio {info['ratio']:.1f}x, "
          f"{info['changed']} changed elements")
    print(f"{'tensor':40s} {'dtype':9s} {'shape':18s} {'kind':5s} {'changed':>10s} {'of':>10s} {'bytes':>10s}  enc")
    for name, t in info["tensors"].items():
        print(f"{name[:40]:40s} {t['dtype']:9s} {str(t['shape'])[:18]:18s} {t['kind']:5s} {t['changed']:>10d} "
              f"{t['numel']:>10d} {t['payload_bytes']:>10d}  {','.join(t['encodings'])}")
    for name in info["removed"]:
        print(f"{name[:40]:40s} removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sync", description="Lossless sparse-delta weight sync")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", help="encode NEW as a delta against BASE (safetensors files)")
    e.add_argument("base")
    e.add_argument("new")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--fast", action="store_true", help="the fast level (Ray path) instead of best compression")
    e.add_argument("--base-version", type=int, default=0)
    e.add_argument("--target-version", type=int, default=1)
    e.add_argument("--bucket-mb", type=int, default=32)
    e.set_defaults(func=_cmd_encode)
    size_help = ("largest DELTA file and largest total of tensors a payload may create, e.g. 8G, 512M "
                 "(default: 8 GiB, or a quarter of the address-space limit when lower)")
    a = sub.add_parser("apply", help="apply DELTA to BASE, write the verified result to OUT")
    a.add_argument("base")
    a.add_argument("delta")
    a.add_argument("-o", "--output", required=True)
    a.add_argument("--max-bytes", type=parse_size, default=None, help=size_help)
    a.set_defaults(func=_cmd_apply)
    i = sub.add_parser("inspect", help="describe a DELTA file")
    i.add_argument("delta")
    i.add_argument("--json", action="store_true")
    i.add_argument("--max-bytes", type=parse_size, default=None, help=size_help)
    i.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader stopped early (`... --json | head`): not the input's fault, nothing to report.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SyncError as e:
        return _fail(type(e).__name__, e)
    except MemoryError:
        return _fail("LimitError", "out of memory (lower --max-bytes or give the process more memory)")
    except OSError as e:
        return _fail("BadInputError", e)
    except RecursionError as e:  # pragma: no cover - the decoder bounds nesting; last line of defence
        return _fail("CorruptBucketError", e)


def _fail(kind: str, e) -> int:
    print(f"error: {kind}: {' '.join(str(e).split())}"[:2000], file=sys.stderr)
    return 2
