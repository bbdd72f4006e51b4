"""Command line: ship and inspect weight deltas between safetensors checkpoints.

    python -m sync encode BASE NEW -o DELTA [--fast]   # best compression unless --fast
    python -m sync apply BASE DELTA -o OUT             # OUT == NEW, bit for bit
    python -m sync inspect DELTA [--json]              # versions, tensors, changes, sizes, ratio

A DELTA file is the payload's buckets in a small container (FORMAT.md). Bad input gives a
one-line typed error and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sync.codec import apply, encode, inspect_payload
from sync.errors import BadInputError, SyncError
from sync.format import pack_container, parse_container


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


def _read_delta(path: str) -> list[bytes]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e})") from None
    return parse_container(data, what=path)


def _cmd_encode(args) -> int:
    base, _ = _load_state(args.base)
    new, meta = _load_state(args.new)
    t0 = time.perf_counter()
    buckets = encode(base, new, base_version=args.base_version, target_version=args.target_version,
                     level="fast" if args.fast else "best", bucket_bytes=args.bucket_mb << 20, metadata=meta)
    dt = time.perf_counter() - t0
    data = pack_container(buckets)
    Path(args.output).write_bytes(data)
    info = inspect_payload(buckets)
    print(f"wrote {args.output}: {len(data)} bytes, {info['buckets']} bucket(s), {info['changed']} changed elements, "
          f"ratio {info['ratio']:.1f}x vs dense {info['dense_bytes']} bytes, encoded in {dt:.2f}s")
    return 0


def _cmd_apply(args) -> int:
    buckets = _read_delta(args.delta)
    info = inspect_payload(buckets)
    if info["base_version"] is None:
        base, version = {}, None  # a snapshot needs no base
    else:
        base, _ = _load_state(args.base)
        version = info["base_version"]
    new, _ = apply(base, version, buckets)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in new.items()}, args.output, metadata=info["metadata"] or None)
    print(f"wrote {args.output}: version {info['target_version']}, {len(new)} tensors, verified")
    return 0


def _cmd_inspect(args) -> int:
    info = inspect_payload(_read_delta(args.delta))
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
    a = sub.add_parser("apply", help="apply DELTA to BASE, write the verified result to OUT")
    a.add_argument("base")
    a.add_argument("delta")
    a.add_argument("-o", "--output", required=True)
    a.set_defaults(func=_cmd_apply)
    i = sub.add_parser("inspect", help="describe a DELTA file")
    i.add_argument("delta")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SyncError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
