"""Structure-aware fuzzing of the decoder: header fields mutated with every checksum recomputed
(types, sizes, shapes, dtypes, versions, names, nesting), payloads that declare huge sizes, and
the decoder and `python -m sync apply` under an address-space limit. Only SyncError subclasses
may come out; a rejected payload leaves the receiver's state exactly as it was; an accepted one
is exactly the sender's result.

Buckets are built here with struct, zstandard and xxhash straight from FORMAT.md, not with the
project's packer, so the tests do not inherit its assumptions."""
from __future__ import annotations

import copy
import json
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import xxhash
import zstandard

from sync import codec, encoder
from sync.errors import CorruptBucketError, LimitError, SyncError, TensorMismatchError
from sync.format import parse_bucket
from sync_helpers import assert_same_state, bits, clone_state, encode_fast_trying_gap, perturb_bf16

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- building buckets from the spec


def raw_bucket(header_json: bytes, body: bytes, version: int = 1, flags: int = 0) -> bytes:
    """A bucket per FORMAT.md: magic, version, flags, H, B, zstd(header), body, xxh3_64."""
    head = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(header_json)
    data = struct.pack("<4sHHIQ", b"SPDB", version, flags, len(head), len(body)) + head + body
    return data + struct.pack("<Q", xxhash.xxh3_64_intdigest(data))


def bucket(header: dict, body: bytes = b"") -> bytes:
    return raw_bucket(json.dumps(header, allow_nan=True).encode(), body)


def container(buckets: list[bytes]) -> bytes:
    out = struct.pack("<4sHHI", b"SPDL", 1, 0, len(buckets))
    for b in buckets:
        out += struct.pack("<Q", len(b)) + b
    return out


def split(b: bytes) -> tuple[dict, bytes]:
    parsed = parse_bucket(b, 0)
    return json.loads(json.dumps(parsed.header)), bytes(parsed.body)


# ---------------------------------------------------------------- states and payloads


def _states():
    gen = torch.Generator().manual_seed(5)
    old = {
        "emb": (torch.randn(16, 24, generator=gen) * 0.02).to(torch.bfloat16),
        "w": (torch.randn(3000, generator=gen) * 0.05).to(torch.bfloat16),
        "rare": (torch.randn(2000, generator=gen) * 0.05).to(torch.bfloat16),
        "b": torch.randn(8, generator=gen),
        "step": torch.tensor([4], dtype=torch.int64),
        "frozen": torch.randn(100, generator=gen),  # unchanged: a "none" entry
        "gone": torch.randn(4, generator=gen).to(torch.float16),
    }
    new = {k: v for k, v in old.items() if k != "gone"}
    new["emb"] = perturb_bf16(old["emb"], 0.05, gen)
    new["w"] = perturb_bf16(old["w"], 0.3, gen)  # level fast: "mask"
    new["rare"] = perturb_bf16(old["rare"], 0.005, gen)  # level fast: "gap8" (or "gap" where tried)
    new["b"] = old["b"] + 0.001
    new["step"] = torch.tensor([5], dtype=torch.int64)
    new["born"] = torch.arange(6, dtype=torch.int32)
    new["empty"] = torch.zeros(0, 3)
    return old, new


DEEP = json.loads("[" * 40 + "]" * 40)
HOSTILE = [
    -1, 0, 1, 2, 7, 2**31, 2**53, 2**63, 2**64, 10**12, 10**40, 1.0, 2.5, 1e308, float("inf"), float("-inf"),
    float("nan"), True, False, None, "", "w", "emb", "__metadata__", "x" * 5000, [], {}, [1], [-1], [3.0],
    [True], [2**40, 2**40], [2**31] * 4, [10**6] * 8, [1] * 40, [16, 24], [24, 16], {"a": 1}, "float32", "bfloat16",
    "int64", "float16", "complex64", "whole", "delta", "none", "gap", "ctx", "mask", "raw", "planes", "0" * 16,
    "F" * 16, "fast", "best", DEEP, {"dtype": "bfloat16", "shape": [16, 24], "xxh": "0" * 16},
]


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _set_everywhere(h: dict, name: str, key: str, value) -> None:
    """Change `key` of tensor `name` in the manifest and in every entry of this header."""
    for m in h.get("manifest", []):
        if m["name"] == name:
            m[key] = copy.deepcopy(value)
    for e in h.get("entries", []):
        if e["name"] == name:
            e[key] = copy.deepcopy(value)


def mutate_header(rng: random.Random, h: dict, body: bytes) -> tuple[dict | bytes, bytes, str]:
    """One structure-aware change of a parsed header (the checksum is recomputed by the caller)."""
    paths = [p for p in _paths(h) if p]
    op = rng.randrange(9)
    if op <= 3:  # replace any field, anywhere, with a hostile value
        path = rng.choice(paths)
        _get(h, path[:-1])[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
        return h, body, f"set {path}"
    if op == 4:  # delete a key or list item
        path = rng.choice(paths)
        parent = _get(h, path[:-1])
        del parent[path[-1]]
        return h, body, f"delete {path}"
    if op == 5:  # a consistent change of one tensor's dtype or shape (manifest and entries, maybe base)
        names = [m["name"] for m in h.get("manifest", [])] or [e["name"] for e in h.get("entries", [])] or ["w"]
        name = rng.choice(names)
        key = rng.choice(["dtype", "shape"])
        value = rng.choice(["float32", "float16", "int16", "bfloat16"]) if key == "dtype" else rng.choice([[24, 16], [384], [2, 192], [3000], [6]])
        _set_everywhere(h, name, key, value)
        if rng.random() < 0.5:
            for m in h.get("manifest", []):
                if m["name"] == name and isinstance(m.get("base"), dict):
                    m["base"][key] = copy.deepcopy(value)
        return h, body, f"consistent {key} of {name}"
    if op == 6:  # versions: booleans, floats, target <= base, huge
        for key, v in ((rng.choice(["base", "target"]), rng.choice([True, False, 1.0, 0, 1, 2, -1, 2**53, 2**63, None, "1"])),):
            h[key] = v
        return h, body, "version"
    if op == 7:  # nesting and junk at the top
        h[rng.choice(["entries", "manifest", "metadata", "removed", "junk"])] = copy.deepcopy(rng.choice([DEEP, {"k": DEEP}, {"k": 1}, {"k": ["v"]}]))
        return h, body, "nesting"
    raw = json.dumps(h).encode()  # raw JSON damage the json module cannot produce
    choice = rng.randrange(4)
    if choice == 0:
        return b"[" * 100_000 + b"]" * 100_000, body, "deep raw JSON"
    if choice == 1:
        return raw[: rng.randrange(len(raw))], body, "truncated JSON"
    if choice == 2:
        return b'{"a": ' * 5000 + b"1" + b"}" * 5000, body, "deep object"
    return raw.replace(b'"', b"'", 1), body, "bad JSON"


def _decode(state, version, buckets, in_place):
    if in_place:
        res = codec.decode_into(state, version, buckets, in_place=True)
        return {n: codec.tensor_from_bits(res.arrays[n], *res.meta[n]) if n in res.arrays else state[n] for n in res.order}
    return codec.apply(state, version, buckets)[0]


def run_structured_fuzz(count: int, seed: int, monkeypatch) -> dict:
    monkeypatch.setattr(encoder, "GAP_ALSO_MAX_ELEMS", 0)  # small chunks: "mask" rather than also "gap"
    old, new = _states()
    delta = {lvl: encoder.encode(old, new, base_version=1, target_version=2, level=lvl, bucket_bytes=4096)
             for lvl in ("fast", "best")}
    delta["fast_gap"] = encode_fast_trying_gap(old, new)
    snapshot = encoder.encode(None, new, base_version=None, target_version=2, level="fast", bucket_bytes=4096)
    encs = {e["enc"] for lvl in ("fast", "fast_gap") for b in delta[lvl] for e in parse_bucket(b, 0).header["entries"]}
    assert {"gap", "gap8", "mask", "none"} <= encs, encs
    reference = {k: bits(v).clone() for k, v in old.items()}
    rng = random.Random(seed)
    outcomes = {"error": 0, "ok": 0, "inspect_error": 0}
    kinds: dict[str, int] = {}
    for n in range(count):
        payload = rng.choice([delta["fast"], delta["best"], delta["fast_gap"], snapshot])
        buckets = list(payload)
        i = rng.randrange(len(buckets))
        h, body = split(buckets[i])
        h, body, what = mutate_header(rng, h, body)
        buckets[i] = raw_bucket(h, body) if isinstance(h, bytes) else bucket(h, body)
        try:
            codec.inspect_payload(buckets)
        except SyncError:
            outcomes["inspect_error"] += 1
        in_place = n % 2 == 1
        state = clone_state(old) if in_place else old
        try:
            got = _decode(state if payload is not snapshot else {}, 1 if payload is not snapshot else None, buckets, in_place)
        except SyncError as e:
            outcomes["error"] += 1
            kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
            for k, v in state.items():
                assert torch.equal(bits(v), reference[k]), f"{what}: state {k} changed"
            continue
        if what.startswith("consistent"):
            # A whole tensor relabelled consistently (e.g. bfloat16 -> float16, [16, 24] -> [24, 16])
            # is a different but self-consistent payload: same bytes, the relabelled tensor only.
            assert sorted(got) == sorted(new), what
            for k in new:
                assert torch.equal(bits(got[k]).view(torch.uint8), bits(new[k]).view(torch.uint8)), what
                if not what.endswith(f" of {k}"):
                    assert got[k].dtype == new[k].dtype and got[k].shape == new[k].shape, what
        else:
            assert_same_state(got, new)  # accepted: exactly the sender's result
        outcomes["ok"] += 1
    outcomes["kinds"] = kinds
    return outcomes


def test_structured_fuzz_default(monkeypatch):
    outcomes = run_structured_fuzz(1200, seed=2026, monkeypatch=monkeypatch)
    assert outcomes["error"] > 1000, outcomes
    assert {"CorruptBucketError", "TensorMismatchError", "LimitError"} <= set(outcomes["kinds"]), outcomes


@pytest.mark.slow
def test_structured_fuzz_slow(monkeypatch):
    outcomes = run_structured_fuzz(20_000, seed=7, monkeypatch=monkeypatch)
    assert outcomes["error"] > 17_000, outcomes


# ---------------------------------------------------------------- targeted checks


def _delta_header_case(change):
    old, new = _states()
    (b0, *rest) = encoder.encode(old, new, base_version=1, target_version=2, level="fast")
    h, body = split(b0)
    change(h)
    return old, [bucket(h, body), *rest]


@pytest.mark.parametrize("change, error, message", [
    (lambda h: h.update(base=True), CorruptBucketError, "'base' must be an integer"),
    (lambda h: h.update(target=2.0), CorruptBucketError, "'target' must be an integer"),
    (lambda h: h.update(target=1), CorruptBucketError, "not greater than 'base'"),
    (lambda h: h.update(target=2**60), CorruptBucketError, "'target' is 1152921504606846976, expected 0..9007199254740991"),
    (lambda h: h.update(count=float("inf")), CorruptBucketError, "'count' must be an integer"),
    (lambda h: h["manifest"][0].update(shape=[2**40, 2**40]), LimitError, "declares more than"),
    (lambda h: h["manifest"][0].update(name="__metadata__"), CorruptBucketError, "reserved"),
    (lambda h: h.update(metadata={"k": 1}), CorruptBucketError, "'metadata' must map strings to strings"),
    (lambda h: h.update(metadata={"k": DEEP}), CorruptBucketError, "nests deeper"),
    (lambda h: _set_everywhere(h, "emb", "dtype", "float16"), CorruptBucketError, "must equal its base's"),
    (lambda h: _set_everywhere(h, "emb", "shape", [24, 16]), CorruptBucketError, "must equal its base's"),
])
def test_bad_fields_are_named(change, error, message):
    old, buckets = _delta_header_case(change)
    with pytest.raises(error, match=message):
        codec.apply(old, 1, buckets)
    with pytest.raises(error, match=message):
        codec.inspect_payload(buckets)


def test_delta_of_another_dtype_or_shape_than_the_receiver_is_refused():
    """Base, manifest and entries agree with each other on a dtype the receiver does not hold."""
    def change(h):
        _set_everywhere(h, "emb", "shape", [24, 16])
        next(m for m in h["manifest"] if m["name"] == "emb")["base"]["shape"] = [24, 16]
    old, buckets = _delta_header_case(change)
    state = clone_state(old)
    with pytest.raises(TensorMismatchError, match=r"tensor 'emb': receiver has bfloat16\[16, 24\]"):
        codec.decode_into(state, 1, buckets, in_place=True)
    assert_same_state(state, old)


def snapshot_declaring(numel: int, dtype: str = "float32", chunk: int = 1 << 22, body_of=None) -> list[bytes]:
    """A checksummed snapshot of one tensor `w` of `numel` elements whose entries cover it in
    chunks with tiny "planes" bodies that claim the full chunk size (a decompression bomb)."""
    isz = {"float32": 4, "bfloat16": 2, "float64": 8}[dtype]
    entries, body = [], b""
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        frame = body_of(stop - start, isz) if body_of else struct.pack("<IB", 0xFD2FB528, 0xA0) + struct.pack("<I", (stop - start) * isz)
        entries.append({"name": "w", "dtype": dtype, "shape": [numel], "kind": "whole", "start": start, "stop": stop,
                        "enc": "planes", "changed": stop - start, "off": len(body), "len": len(frame), "xxh": "0" * 16})
        body += frame
    header = {"payload": "0" * 16, "base": None, "target": 1, "level": "fast", "index": 0, "count": 1,
              "entries": entries, "removed": [],
              "manifest": [{"name": "w", "dtype": dtype, "shape": [numel], "xxh": "0" * 16, "kind": "whole", "base": None}]}
    return [bucket(header, body)]


def test_declared_sizes_are_bounded_before_allocation():
    with pytest.raises(LimitError, match=r"creates 8589934592 bytes of tensors .* over the limit of 1073741824"):
        codec.apply({}, None, snapshot_declaring(2**31), max_bytes=1 << 30)
    with pytest.raises(LimitError, match="over the limit"):
        codec.inspect_payload(snapshot_declaring(2**31), max_bytes=1 << 30)
    with pytest.raises(LimitError, match="declares more than"):
        codec.apply({}, None, [bucket({"payload": "0" * 16, "base": None, "target": 1, "level": "fast", "index": 0,
                                       "count": 1, "entries": [], "removed": [],
                                       "manifest": [{"name": "w", "dtype": "float32", "shape": [10**12, 10**12],
                                                     "xxh": "0" * 16, "kind": "whole", "base": None}]})])
    # A header whose zstd frame declares 1 GiB of JSON: refused from the frame header alone.
    frame = struct.pack("<IB", 0xFD2FB528, 0xA0) + struct.pack("<I", 1 << 30)
    data = struct.pack("<4sHHIQ", b"SPDB", 1, 0, len(frame), 0) + frame
    with pytest.raises(LimitError, match="header declares 1073741824 bytes"):
        codec.apply({}, None, [data + struct.pack("<Q", xxhash.xxh3_64_intdigest(data))])


# ---------------------------------------------------------------- under an address-space limit

_LIMITED = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (3 * 1000**3, 3 * 1000**3))
    from sync import codec
    from sync.errors import SyncError
    from sync.format import parse_container
    for path in sys.argv[1:]:
        t0 = time.time()
        try:
            codec.apply({}, None, parse_container(open(path, "rb").read()))
            print("ACCEPTED", path)
        except SyncError as e:
            print("typed", type(e).__name__, round(time.time() - t0, 1), path)
    # and the structure-aware fuzzing itself, under the same limit
    sys.path.insert(0, "tests/sync")
    from test_sync_fuzz_structured import run_structured_fuzz

    class Patch:
        setattr = staticmethod(setattr)

    outcomes = run_structured_fuzz(300, seed=31, monkeypatch=Patch())
    print("fuzz", outcomes["error"], outcomes["ok"])
""")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> list[Path]:
    """Crafted files, checksums valid: every one must be refused with a typed error."""
    d = tmp_path_factory.mktemp("bombs")
    cases = {
        "8gib_declared.delta": snapshot_declaring(2**31),  # 8 GiB of float32 claimed by a ~20 KB file
        "2gib_declared.delta": snapshot_declaring(2**29),  # fits 1 TiB, not 3 GB of address space
        "lying_frames.delta": snapshot_declaring(2**24, body_of=lambda n, isz: zstandard.ZstdCompressor().compress(b"\0" * 16)),
        "huge_shape.delta": snapshot_declaring(0)[:0] + [bucket({"payload": "0" * 16, "base": None, "target": 1, "level": "fast",
                                                                  "index": 0, "count": 1, "entries": [], "removed": [],
                                                                  "manifest": [{"name": "w", "dtype": "float64", "shape": [2**62, 4],
                                                                                "xxh": "0" * 16, "kind": "whole", "base": None}]})],
        "deep_json.delta": [raw_bucket(b"[" * 200_000 + b"]" * 200_000, b"")],
        "nan_count.delta": [bucket({"payload": "0" * 16, "base": None, "target": 1, "level": "fast", "index": 0,
                                    "count": float("nan"), "entries": [], "removed": [], "manifest": []})],
        "reserved_name.delta": encoder.encode(None, {"w": torch.ones(3)}, base_version=None, target_version=1),
    }
    h, body = split(cases["reserved_name.delta"][0])
    h["manifest"][0]["name"] = "__metadata__"
    for e in h["entries"]:
        e["name"] = "__metadata__"
    cases["reserved_name.delta"] = [bucket(h, body)]
    paths = []
    for name, buckets in cases.items():
        (d / name).write_bytes(container(buckets))
        paths.append(d / name)
    # A container that declares 2^32 - 1 buckets in 12 bytes.
    (d / "many_buckets.delta").write_bytes(struct.pack("<4sHHI", b"SPDL", 1, 0, 2**32 - 1))
    paths.append(d / "many_buckets.delta")
    assert max(p.stat().st_size for p in paths) < 64 * 1024
    return paths


def test_decoder_under_a_memory_limit_raises_typed_errors_only(bombs):
    out = subprocess.run([sys.executable, "-c", _LIMITED, *map(str, bombs[:-1])], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    *lines, fuzz = out.stdout.splitlines()
    assert len(lines) == len(bombs) - 1 and all(ln.startswith("typed ") for ln in lines), out.stdout
    assert fuzz.startswith("fuzz ") and int(fuzz.split()[1]) > 250, out.stdout


def _cli_apply_under_ulimit(bombs: list[Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = tmp_path / "base.safetensors"
    save_file({"w": torch.ones(3)}, str(base))
    script = "; ".join(f"{sys.executable} -m sync apply {base} {p} -o {tmp_path / ('out_' + p.name)}; echo rc=$?"
                       for p in bombs)
    out = subprocess.run(["bash", "-c", f"ulimit -v 3000000; {script}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.stdout.split() == ["rc=2"] * len(bombs), out.stdout + out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(errors) == len(bombs) and all(ln.startswith("error: ") for ln in errors), out.stderr[-3000:]
    assert not list(tmp_path.glob("out_*")) and not list(tmp_path.glob(".out_*"))


def test_cli_apply_under_ulimit_exits_2_with_one_error_line_and_no_output(bombs, tmp_path):
    _cli_apply_under_ulimit([p for p in bombs if p.name in ("8gib_declared.delta", "2gib_declared.delta")], tmp_path)


@pytest.mark.slow
def test_cli_apply_under_ulimit_every_bomb(bombs, tmp_path):
    _cli_apply_under_ulimit(bombs, tmp_path)


def test_cli_limits_and_no_partial_output(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from sync.cli import main, parse_size

    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    old, new = _states()
    new.pop("empty")  # safetensors cannot hold a tensor without elements in every version
    save_file(old, str(tmp_path / "base.safetensors"))
    save_file(new, str(tmp_path / "new.safetensors"))
    delta = tmp_path / "d.spdl"
    assert main(["encode", str(tmp_path / "base.safetensors"), str(tmp_path / "new.safetensors"), "-o", str(delta)]) == 0
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")  # a failing apply leaves an existing file as it was
    assert main(["apply", str(tmp_path / "base.safetensors"), str(delta), "-o", str(out), "--max-bytes", "1K"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: LimitError:") and "--max-bytes" in err[0]
    assert out.read_bytes() == b"precious"
    assert main(["apply", str(tmp_path / "base.safetensors"), str(delta), "-o", str(out)]) == 0
    assert_same_state(load_file(str(out)), new)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("relabel_base", [False, True])
def test_ray_receiver_refuses_a_delta_relabelled_to_another_dtype(relabel_base):
    """The receiver case of issue 11: a delta whose entry says float16 where the receiver holds
    bfloat16 (same width, checksums consistent) used to commit weights that differ from the
    verified staging copy. Now it is refused and target, shadow and version stay as they were."""
    from sync.receiver import WeightReceiver

    old, new = _states()
    new = {k: new.get(k, v) for k, v in old.items()}  # a receiver with a target keeps its tensor names
    target = {k: v.clone() for k, v in old.items()}
    receiver = WeightReceiver(target, version=1)
    before = receiver.state_checksum()
    (b0, *rest) = encoder.encode(old, new, base_version=1, target_version=2, level="fast")
    h, body = split(b0)
    _set_everywhere(h, "emb", "dtype", "float16")
    if relabel_base:
        next(m for m in h["manifest"] if m["name"] == "emb")["base"]["dtype"] = "float16"
    forged = [bucket(h, body)] + [bucket(*_relabel(split(b), "emb", "float16")) for b in rest]
    with pytest.raises(SyncError, match="emb"):
        receiver.stage_buckets([forged])
    assert receiver.version == 1 and receiver.state_checksum() == before
    assert_same_state(target, old)
    # the untouched payload still applies, and target and staging copy agree
    receiver.commit(receiver.stage_buckets([encoder.encode(old, new, base_version=1, target_version=2, level="fast")]))
    assert_same_state(target, new)
    assert receiver.state_checksum() == codec_state_checksum(new)


def _relabel(parts, name, dtype):
    h, body = parts
    for e in h.get("entries", []):
        if e["name"] == name:
            e["dtype"] = dtype
    return h, body


def codec_state_checksum(state):
    from sync.checksum import state_checksum

    return state_checksum(state)


def test_cli_output_path_problems_are_one_line_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    from sync.cli import main

    save_file({"w": torch.ones(3)}, str(tmp_path / "b.st"))
    save_file({"w": torch.ones(3) * 2}, str(tmp_path / "n.st"))
    assert main(["encode", str(tmp_path / "b.st"), str(tmp_path / "n.st"), "-o", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    for out, message in ((tmp_path / "nope" / "o.st", "does not exist"), (tmp_path, "is a directory")):
        assert main(["apply", str(tmp_path / "b.st"), str(tmp_path / "d"), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: BadInputError:") and message in err[0]
    assert main(["apply", str(tmp_path / "b.st"), str(tmp_path / "d"), "-o", str(tmp_path / "o.st")]) == 0
    assert (tmp_path / "o.st").stat().st_mode & 0o044  # readable as files normally are
