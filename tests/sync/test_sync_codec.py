"""Round trips of the delta codec: bit-exact for every dtype and corner case, sizes sane."""
from __future__ import annotations

import pytest
import torch

from sync import codec, encoder
from sync.errors import TensorMismatchError, VersionMismatchError
from sync_helpers import assert_same_state, bits, clone_state, perturb_bf16

LEVELS = ["fast", "best"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _state(gen):
    return {
        "w_bf16": (torch.randn(300, 70, generator=gen) * 0.02).to(torch.bfloat16),
        "w_fp16": (torch.randn(1000, generator=gen)).to(torch.float16),
        "w_fp32": torch.randn(257, generator=gen),
        "w_fp64": torch.randn(33, generator=gen, dtype=torch.float64),
        "i64": torch.randint(-1000, 1000, (100,), generator=gen),
        "i32": torch.randint(-(2**31), 2**31 - 1, (100,), generator=gen, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (50,), generator=gen, dtype=torch.int8),
        "u8": torch.randint(0, 255, (50,), generator=gen, dtype=torch.uint8),
        "flag": torch.rand(40, generator=gen) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }


def _mutate_all(state, gen, frac):
    new = clone_state(state)
    for k, t in new.items():
        if t.numel() == 0:
            continue
        flat = bits(t)
        n = flat.numel()
        idx = torch.randperm(n, generator=gen)[: max(1, int(n * frac))]
        if t.dtype == torch.bool:
            flat[idx] ^= 1
        else:
            flat[idx] += torch.randint(1, 5, (idx.numel(),), generator=gen).to(flat.dtype)
    return new


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("frac", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_round_trip_all_dtypes(level, frac):
    gen = _gen(1)
    old = _state(gen)
    new = _mutate_all(old, gen, frac) if frac else clone_state(old)
    buckets = codec.encode(old, new, base_version=7, target_version=8, level=level)
    got, version = codec.apply(old, 7, buckets)
    assert version == 8
    assert_same_state(got, new)


@pytest.mark.parametrize("level", LEVELS)
def test_special_float_bit_patterns(level):
    old = {"f32": torch.tensor([1.0, 0.0, -0.0, 2.0, 5.0, 6.0]), "bf": torch.tensor([1.0, 0.0, 2.0, -3.0], dtype=torch.bfloat16)}
    new = clone_state(old)
    # distinct NaN payloads, signed zeros and infinities must survive exactly
    bits(new["f32"])[:] = torch.tensor([0x7FC00001, 0x80000000 - 2**32, 0x00000000, 0x7F800000, 0xFF800000 - 2**32, 0x7FA00000], dtype=torch.int32)
    bits(new["bf"])[:] = torch.tensor([0x7FC1, -0x8000, 0x7F80, 0x7F81], dtype=torch.int16)
    got, _ = codec.apply(old, 0, codec.encode(old, new, base_version=0, target_version=1, level=level))
    assert_same_state(got, new)
    assert torch.equal(bits(got["f32"]), bits(new["f32"]))


@pytest.mark.parametrize("level", LEVELS)
def test_new_removed_reshaped_retyped_tensors(level):
    gen = _gen(2)
    old = {"keep": torch.randn(64, generator=gen), "gone": torch.randn(5, generator=gen),
           "reshaped": torch.randn(4, 6, generator=gen), "retyped": torch.randn(10, generator=gen)}
    new = {"keep": old["keep"].clone(), "reshaped": old["reshaped"].reshape(6, 4).clone(),
           "retyped": old["retyped"].to(torch.bfloat16), "born": torch.arange(12).reshape(3, 4)}
    new["keep"][3] += 1
    buckets = codec.encode(old, new, base_version=1, target_version=2, level=level)
    info = codec.inspect_payload(buckets)
    assert info["removed"] == ["gone"]
    assert {k: v["kind"] for k, v in info["tensors"].items()} == {"keep": "delta", "reshaped": "whole", "retyped": "whole", "born": "whole"}
    got, _ = codec.apply(old, 1, buckets)
    assert_same_state(got, new)


@pytest.mark.parametrize("level", LEVELS)
def test_snapshot_applies_to_any_state(level):
    gen = _gen(3)
    new = _state(gen)
    buckets = codec.encode(None, new, base_version=None, target_version=5, level=level)
    got, version = codec.apply({"unrelated": torch.ones(3)}, 99, buckets)
    assert version == 5
    assert_same_state(got, new)


@pytest.mark.parametrize("level", LEVELS)
def test_multi_bucket_split_tensor(level):
    """A tensor larger than a bucket is split into element ranges across buckets."""
    gen = _gen(4)
    old = {"big": (torch.randn(50_000, generator=gen) * 0.02).to(torch.bfloat16), "small": torch.randn(10, generator=gen)}
    new = {"big": torch.randn(50_000, generator=gen).to(torch.bfloat16), "small": old["small"] + 1}
    buckets = codec.encode(old, new, base_version=0, target_version=1, level=level, bucket_bytes=8192)
    assert len(buckets) > 10
    assert all(len(b) < 8192 + 2048 for b in buckets)
    got, _ = codec.apply(old, 0, buckets)
    assert_same_state(got, new)


def test_apply_never_mutates_state_and_shares_unchanged():
    gen = _gen(5)
    old = _state(gen)
    before = {k: bits(v).clone() for k, v in old.items()}
    new = _mutate_all(old, gen, 0.1)
    new["scalar"] = old["scalar"].clone()
    got, _ = codec.apply(old, 0, codec.encode(old, new, base_version=0, target_version=1))
    for k in old:
        assert torch.equal(bits(old[k]), before[k])
    assert got["scalar"] is old["scalar"]


@pytest.mark.parametrize("level", LEVELS)
def test_ratio_never_below_one_for_random_changes(level):
    """Fully random new bits: the per-chunk dense fallback keeps the payload about dense size."""
    gen = _gen(6)
    old = {"w": torch.randn(200_000, generator=gen).to(torch.bfloat16)}
    new = {"w": torch.randint(-(2**15), 2**15 - 1, (200_000,), generator=gen, dtype=torch.int16).view(torch.bfloat16)}
    buckets = codec.encode(old, new, base_version=0, target_version=1, level=level)
    dense = 200_000 * 2
    assert sum(map(len, buckets)) <= dense + 4096
    got, _ = codec.apply(old, 0, buckets)
    assert_same_state(got, new)


@pytest.mark.parametrize("level", LEVELS)
def test_sparse_delta_size_near_entropy(level):
    """At 1 % changed by +-1..3 ulp, the payload is within 10 % of the i.i.d. entropy estimate
    n*H2(p) + k*log2(6) computed here from the formula (positions uniform, 6 equally likely steps)."""
    import math

    gen = _gen(7)
    n, p = 400_000, 0.01
    old = {"w": (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)}
    new = {"w": perturb_bf16(old["w"], p, gen)}
    k = int(torch.count_nonzero(bits(old["w"]) != bits(new["w"])))
    q = k / n
    estimate_bits = n * (-(q * math.log2(q) + (1 - q) * math.log2(1 - q))) + k * math.log2(6)
    payload = sum(map(len, codec.encode(old, new, base_version=0, target_version=1, level=level)))
    assert payload * 8 < estimate_bits * 1.10 + 8 * 3000  # 3000 bytes of headers and model warm-up


def test_version_and_base_checks():
    gen = _gen(8)
    old = _state(gen)
    new = _mutate_all(old, gen, 0.05)
    buckets = codec.encode(old, new, base_version=3, target_version=4)
    with pytest.raises(VersionMismatchError):
        codec.apply(old, 2, buckets)
    with pytest.raises(VersionMismatchError):
        codec.apply(old, None, buckets)
    wrong = clone_state(old)
    bits(wrong["w_bf16"])[0] += 1
    with pytest.raises(TensorMismatchError, match="w_bf16"):
        codec.apply(wrong, 3, buckets)
    missing = clone_state(old)
    del missing["i8"]
    with pytest.raises(TensorMismatchError, match="i8"):
        codec.apply(missing, 3, buckets)
    reshaped = clone_state(old)
    reshaped["w_fp32"] = torch.randn(1, 257, generator=gen)
    with pytest.raises(TensorMismatchError, match="w_fp32"):
        codec.apply(reshaped, 3, buckets)


def test_encode_rejects_bad_arguments():
    with pytest.raises(ValueError):
        codec.encode({}, {}, base_version=None, target_version=1)
    with pytest.raises(ValueError):
        codec.encode(None, {}, base_version=None, target_version=1, level="ultra")
    with pytest.raises(TensorMismatchError):
        codec.encode(None, {"c": torch.zeros(2, dtype=torch.complex64)}, base_version=None, target_version=1)


def _entries(buckets):
    from sync.format import parse_bucket

    return [e for i, b in enumerate(buckets) for e in parse_bucket(b, i).header["entries"]]


def _mixed_dtypes_with_escapes(sizes: tuple[int, int, int, int], frac: float, big: int, flip: float, gen):
    """bf16, fp32, int8 and fp64 tensors, and a copy with about `frac` of each moved by
    +-1..3 steps of their bit patterns, 5 % of the moves by +-`big` and `flip` of them by a sign
    flip (the large values that take the encodings' escape paths)."""
    old = {
        "bf16": (torch.randn(sizes[0], generator=gen) * 0.02).to(torch.bfloat16),
        "fp32": torch.randn(sizes[1], generator=gen),
        "i8": torch.randint(-128, 127, (sizes[2],), generator=gen, dtype=torch.int8),
        "f64": torch.randn(sizes[3], generator=gen, dtype=torch.float64),
    }
    new = clone_state(old)
    for t in new.values():
        flat = bits(t)
        m = flat.numel()
        idx = torch.randperm(m, generator=gen)[: max(2, int(m * frac))]
        step = torch.randint(1, 4, (idx.numel(),), generator=gen)
        step = torch.where(torch.rand(idx.numel(), generator=gen) < 0.05, torch.full_like(step, big), step)
        step = step * torch.where(torch.rand(idx.numel(), generator=gen) < 0.5, -1, 1)
        flat[idx] = flat[idx] + step.to(flat.dtype)
        flips = idx[torch.rand(idx.numel(), generator=gen) < flip]
        flat[flips] ^= torch.tensor(1, dtype=flat.dtype) << (flat.element_size() * 8 - 1)
    return old, new


@pytest.mark.parametrize("frac", [0.15, 0.3, 0.9, 1.0])
def test_mask_encoding_round_trips_with_escapes(frac, monkeypatch):
    """Level fast codes many-change chunks as "mask"; large moves (sign flips, +-100 ulp)
    take the escape path; odd sizes leave partial 8-element groups and an odd nibble."""
    monkeypatch.setattr(encoder, "GAP_ALSO_MAX_ELEMS", 0)  # small chunks would also try "gap"
    old, new = _mixed_dtypes_with_escapes((100_003, 20_001, 9_999, 5_005), frac, 100, 0.02, _gen(21))
    buckets = codec.encode(old, new, base_version=0, target_version=1, level="fast", bucket_bytes=1 << 16)
    encs = {e["enc"] for e in _entries(buckets)}
    assert "mask" in encs, encs
    got, _ = codec.apply(old, 0, buckets)
    assert_same_state(got, new)


@pytest.mark.parametrize("frac", [0.0005, 0.01, 0.05, 0.12])
def test_gap8_encoding_round_trips_with_escapes(frac, monkeypatch):
    """Level fast codes few-change chunks as "gap8": gaps of 255 or more (rare changes) and
    values of 255 or more (sign flips, +-100 ulp, wide dtypes) take the escape streams."""
    monkeypatch.setattr(encoder, "GAP_ALSO_MAX_ELEMS", 0)  # small chunks would also try "gap"
    old, new = _mixed_dtypes_with_escapes((200_003, 40_001, 30_011, 20_005), frac, 300, 0.05, _gen(23))
    new["i8"][:3] = old["i8"][:3] + 1  # a change at position 0 (gap from -1) and runs of gap 1
    buckets = codec.encode(old, new, base_version=0, target_version=1, level="fast", bucket_bytes=1 << 16)
    encs = {e["enc"] for e in _entries(buckets)}
    assert encs <= {"gap8", "none"} and "gap8" in encs, encs
    got, _ = codec.apply(old, 0, buckets)
    assert_same_state(got, new)


def test_gap8_size_near_entropy():
    """At 1 % changed by +-1..3 ulp, "gap8" stays within 15 % of the i.i.d. entropy
    n*H2(p) + k*log2(6) bits: zstd's entropy stage on the gap and value bytes does the coding."""
    import math

    gen = _gen(24)
    n, p = 2_000_000, 0.01
    old = {"w": (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)}
    new = {"w": perturb_bf16(old["w"], p, gen)}
    buckets = codec.encode(old, new, base_version=0, target_version=1, level="fast")
    assert {e["enc"] for e in _entries(buckets)} == {"gap8"}
    k = int(torch.count_nonzero(bits(old["w"]) != bits(new["w"])))
    h2 = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    entropy_bytes = (n * h2 + k * math.log2(6)) / 8
    body = sum(e["len"] for e in _entries(buckets))
    assert body <= 1.15 * entropy_bytes, (body, entropy_bytes)


def test_mask_size_near_entropy():
    """At 30 % changed by +-1..3 ulp, "mask" stays within 15 % of n*H2(p) + k*log2(6)."""
    import math

    gen = _gen(22)
    n, p = 400_000, 0.3
    old = {"w": (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)}
    new = {"w": perturb_bf16(old["w"], p, gen)}
    k = int(torch.count_nonzero(bits(old["w"]) != bits(new["w"])))
    q = k / n
    estimate_bits = n * (-(q * math.log2(q) + (1 - q) * math.log2(1 - q))) + k * math.log2(6)
    buckets = codec.encode(old, new, base_version=0, target_version=1, level="fast")
    assert {e["enc"] for e in _entries(buckets)} == {"mask"}
    assert sum(map(len, buckets)) * 8 < estimate_bits * 1.15 + 8 * 2000


def test_mask_body_inconsistent_with_changes_is_rejected(monkeypatch):
    """A mask body whose masks claim one change too many (valid zstd, valid checksums) fails
    with CorruptBucketError and leaves the state untouched."""
    import zstandard

    from sync.errors import CorruptBucketError
    from sync.format import pack_bucket, parse_bucket

    monkeypatch.setattr(encoder, "GAP_ALSO_MAX_ELEMS", 0)
    gen = _gen(23)
    old = {"w": (torch.randn(4000, generator=gen) * 0.02).to(torch.bfloat16)}
    new = {"w": perturb_bf16(old["w"], 0.3, gen)}
    (bucket,) = codec.encode(old, new, base_version=0, target_version=1, level="fast")
    b = parse_bucket(bucket, 0)
    (e,) = b.header["entries"]
    assert e["enc"] == "mask"
    data = bytearray(zstandard.ZstdDecompressor().decompress(bytes(b.body[e["off"] : e["off"] + e["len"]])))
    g = next(i for i in range(500) if data[i] != 0xFF)
    data[g] |= (~data[g]) & -(~data[g]) & 0xFF  # set the lowest clear bit: one extra change
    body = zstandard.ZstdCompressor(level=1).compress(bytes(data))
    e["len"] = len(body)
    forged = pack_bucket(b.header, body)
    before = bits(old["w"]).clone()
    with pytest.raises(CorruptBucketError, match="mask stream is corrupt"):
        codec.apply(old, 0, [forged])
    assert torch.equal(bits(old["w"]), before)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64"])
def test_gap8_kernel_streams_match_a_numpy_reference(dtype):
    """encode_gap8 walks the changed lanes of 64-bit words; its streams must equal gaps and
    zigzagged differences computed element by element, for every width, density and ragged tail."""
    import numpy as np

    from sync import delta_kernels as K

    dt = np.dtype(dtype)
    w, per = dt.itemsize * 8, 8 // dt.itemsize
    mask = np.uint64((1 << w) - 1)
    rng = np.random.default_rng(7)
    for n in (1, 7, 1001, 100_003):
        for frac in (0.0, 0.01, 0.2, 1.0):
            old = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
            new = old.copy()
            moved = rng.random(n) < frac
            new[moved] = rng.integers(0, np.iinfo(dt).max, int(moved.sum()), dtype=dt, endpoint=True)
            nw = n // per
            g, v = np.empty(n, np.uint8), np.empty(n, np.uint8)
            ge, ve = np.empty(n, np.uint32), np.empty(n, np.uint64)
            j, eg, ev = K.encode_gap8(old, new, old[: nw * per].view(np.uint64), new[: nw * per].view(np.uint64),
                                      per, w, mask, g, v, ge, ve)
            pos = np.flatnonzero(old != new)
            gaps = np.diff(np.concatenate([[-1], pos]))
            d = (new[pos].astype(np.uint64) - old[pos].astype(np.uint64)) & mask
            u = ((d << np.uint64(1)) & mask) ^ (mask * ((d >> np.uint64(w - 1)) & np.uint64(1)))
            assert j == len(pos)
            assert np.array_equal(g[:j], np.minimum(gaps, 255)) and np.array_equal(ge[:eg], gaps[gaps >= 255])
            assert np.array_equal(v[:j], np.minimum(u, 255)) and np.array_equal(ve[:ev], u[u >= 255])
            if len(pos) > 1:  # one change more than the output holds: refused
                assert K.encode_gap8(old, new, old[: nw * per].view(np.uint64), new[: nw * per].view(np.uint64),
                                     per, w, mask, g[: len(pos) - 1], v, ge, ve)[0] == -1
