"""Fuzz: mutated payloads raise only SyncError subclasses, never give a silently wrong result,
and leave the receiver's state exactly as it was (both for apply() and for in-place decoding
with rollback, which the Ray receiver uses)."""
from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from sync import codec, encoder
from sync.errors import SyncError
from sync.format import pack_bucket, parse_bucket
from sync_helpers import assert_same_state, bits, clone_state, encode_fast_trying_gap, perturb_bf16


def _states():
    gen = torch.Generator().manual_seed(11)
    old = {
        "emb": (torch.randn(64, 48, generator=gen) * 0.02).to(torch.bfloat16),
        "w": (torch.randn(12000, generator=gen) * 0.05).to(torch.bfloat16),
        "rare": (torch.randn(8000, generator=gen) * 0.05).to(torch.bfloat16),
        "noise": torch.randn(5000, generator=gen).to(torch.bfloat16),
        "b": torch.randn(32, generator=gen),
        "step": torch.tensor([4], dtype=torch.int64),
        "gone": torch.randn(8, generator=gen).to(torch.float16),
    }
    new = {k: v for k, v in old.items() if k != "gone"}
    new["emb"] = perturb_bf16(old["emb"], 0.05, gen)
    new["w"] = perturb_bf16(old["w"], 0.3, gen)  # level fast: "mask" entries
    new["rare"] = perturb_bf16(old["rare"], 0.005, gen)  # level fast: "gap8" (or "gap" where tried and smaller)
    new["b"] = old["b"] + 0.001
    new["noise"] = torch.randn(5000, generator=gen).to(torch.bfloat16)  # dense fallback entries
    new["step"] = torch.tensor([5], dtype=torch.int64)
    new["born"] = torch.arange(6, dtype=torch.int32)
    return old, new


def _forge(rng: random.Random, bucket: bytes) -> bytes:
    """Re-pack a bucket with one header field changed (valid checksum, wrong content)."""
    b = parse_bucket(bucket, 0)
    h = json.loads(json.dumps(b.header))
    body = bytearray(b.body)
    choice = rng.randrange(7)
    entries = h.get("entries") or [{}]
    e = rng.choice(entries)
    if choice == 0 and e:
        key = rng.choice(["name", "start", "stop", "off", "len", "changed", "enc", "xxh", "shape", "dtype", "kind"])
        e[key] = rng.choice([0, 1, -1, 7, 10**12, "w", "emb", "gap", "ctx", "mask", "raw", "planes", "none", None, [3], [64, 48], "float32", "whole", "delta", 2.5])
    elif choice == 1:
        h[rng.choice(["base", "target", "index", "count", "payload", "level"])] = rng.choice([0, 1, 2, 99, None, "x"])
    elif choice == 2 and "manifest" in h:
        m = rng.choice(h["manifest"])
        m[rng.choice(["name", "shape", "dtype", "xxh", "kind", "base"])] = rng.choice(["w", [2, 2], "int8", "0" * 16, None, "whole", {"dtype": "bfloat16"}])
    elif choice == 3 and body:
        i = rng.randrange(len(body))
        body[i] ^= 1 << rng.randrange(8)  # body corrupted but checksum recomputed: only the result checksum can tell
    elif choice == 4 and "removed" in h:
        h["removed"] = rng.choice([[], [{"name": "x", "dtype": "float16", "shape": [8], "xxh": "0"}], "junk"])
    elif choice == 5:
        h["entries"] = rng.choice([[], entries + entries, entries[::-1], "junk"])
    else:
        h.pop(rng.choice(list(h)), None)
    return pack_bucket(h, bytes(body))


def _mutate(rng: random.Random, buckets: list[bytes], other: list[bytes]) -> tuple[list, int | None, str]:
    bs = list(buckets)
    kind = rng.randrange(10)
    i = rng.randrange(len(bs))
    if kind == 0:
        bs[i] = bs[i][: rng.randrange(len(bs[i]))]
        return bs, None, "truncate"
    if kind == 1:
        data = bytearray(bs[i])
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
        bs[i] = bytes(data)
        return bs, None, "bitflip"
    if kind == 2 and len(bs) > 1:
        j = rng.randrange(len(bs))
        bs[i], bs[j] = bs[j], bs[i]
        return bs, None, "reorder"
    if kind == 3 and len(bs) > 1:
        del bs[i]
        return bs, None, "drop"
    if kind == 4:
        bs.insert(rng.randrange(len(bs) + 1), bs[i])
        return bs, None, "duplicate"
    if kind == 5:
        return bs, rng.choice([None, 0, 2, 3, -1]), "wrong base version"
    if kind == 6:
        bs[i] = _forge(rng, bs[i])
        return bs, None, "forged header"
    if kind == 7:
        bs[i] = rng.choice(other)
        return bs, None, "bucket of another payload"
    if kind == 8:
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randint(0, 2))], None, "not a delta"
    data = bytearray(bs[i])
    struct.pack_into("<I", data, 8, rng.randrange(2**32))  # header length field
    bs[i] = bytes(data)
    return bs, None, "length field"


def _run_fuzz(count: int, seed: int) -> dict:
    old, new = _states()
    payloads = [
        codec.encode(old, new, base_version=1, target_version=2, level=lvl, bucket_bytes=4096) for lvl in ("fast", "best")
    ] + [encode_fast_trying_gap(old, new)]
    assert all(len(p) >= 3 for p in payloads)
    fast_encs = {e["enc"] for p in (payloads[0], payloads[2]) for b in p for e in parse_bucket(b, 0).header["entries"]}
    assert {"gap", "gap8", "mask", "planes"} <= fast_encs, fast_encs  # every fast encoding gets mutated
    other = codec.encode(old, {k: v.clone() for k, v in new.items()} | {"b": old["b"] - 1}, base_version=1, target_version=2, level="fast", bucket_bytes=4096)
    snapshot = codec.encode(None, new, base_version=None, target_version=2, level="fast", bucket_bytes=4096)
    reference = {k: bits(v).clone() for k, v in old.items()}
    rng = random.Random(seed)
    outcomes = {"error": 0, "ok": 0}
    for n in range(count):
        base = rng.choice(payloads + [snapshot])
        mutated, version, what = _mutate(rng, base, other)
        version = 1 if version is None else version
        in_place = n % 2 == 1
        state = clone_state(old) if in_place else old
        try:
            if in_place:
                res = codec.decode_into(state, version, mutated, in_place=True)
                got = {name: codec.tensor_from_bits(res.arrays[name], *res.meta[name]) if name in res.arrays else state[name] for name in res.order}
            else:
                got, _ = codec.apply(state, version, mutated)
        except SyncError:
            outcomes["error"] += 1
            for k, v in state.items():  # untouched, also after an in-place attempt was rolled back
                assert torch.equal(bits(v), reference[k]), f"{what}: state {k} changed"
            continue
        # Accepted: must be exactly the sender's result (e.g. a mutation that changed nothing).
        assert_same_state(got, new)
        outcomes["ok"] += 1
    return outcomes


def test_fuzz_default(monkeypatch):
    monkeypatch.setattr(encoder, "GAP_ALSO_MAX_ELEMS", 0)  # small chunks: "mask" rather than also "gap"
    outcomes = _run_fuzz(1000, seed=1234)
    assert outcomes["error"] > 900


@pytest.mark.slow
def test_fuzz_slow(monkeypatch):
    monkeypatch.setattr(encoder, "GAP_ALSO_MAX_ELEMS", 0)
    outcomes = _run_fuzz(10_000, seed=99)
    assert outcomes["error"] > 9000


def test_fuzz_receiver_staging(monkeypatch):
    """The rollout side's path (WeightReceiver staging against its own committed weights):
    mutated payloads raise SyncError subclasses only and leave the target and the version exactly
    as they were; a payload it accepts gives exactly the sender's weights."""
    from sync.receiver import WeightReceiver
    from sync.checksum import state_checksum

    monkeypatch.setattr(encoder, "GAP_ALSO_MAX_ELEMS", 0)
    old, new = _states()
    old.pop("gone")  # a receiver's tensors are fixed: no tensors added or removed
    new.pop("born")
    payloads = [codec.encode(old, new, base_version=1, target_version=2, level=lvl, bucket_bytes=4096)
                for lvl in ("fast", "best")] + [encode_fast_trying_gap(old, new)]
    payloads.append(codec.encode(None, new, base_version=None, target_version=2, level="fast", bucket_bytes=4096))
    other = codec.encode(old, {k: v.clone() for k, v in new.items()} | {"b": old["b"] - 1}, base_version=1,
                         target_version=2, level="fast", bucket_bytes=4096)
    reference = {k: bits(v).clone() for k, v in old.items()}
    rng = random.Random(77)
    outcomes = {"error": 0, "ok": 0}
    for _ in range(400):
        mutated, version, what = _mutate(rng, rng.choice(payloads), other)
        version = 1 if version is None else version
        target = clone_state(old)
        rec = WeightReceiver(target, version=version)
        try:
            rec.commit(rec.stage_buckets([mutated]))
        except SyncError:
            outcomes["error"] += 1
            assert rec.version == version, what
            for k, v in target.items():
                assert torch.equal(bits(v), reference[k]), f"{what}: target {k} changed"
            continue
        assert_same_state(target, new)
        assert rec.version == 2 and rec.state_checksum() == state_checksum(new), what
        outcomes["ok"] += 1
    assert outcomes["error"] > 300, outcomes
