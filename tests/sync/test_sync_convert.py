"""sync/convert.py: the published bf16 copy is bit-identical to torch's cast, and its nonzero
count to torch.count_nonzero, on every kind of fp32 value."""
from __future__ import annotations

import torch

from sync.convert import published_copy


def test_fp32_to_bf16_matches_torch_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-2**31, 2**31 - 1, (1_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()  # every bit pattern: NaNs of every payload, subnormals, infs
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 3.3895314e38,
                             1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20], dtype=torch.float32)
    x[: specials.numel()] = specials
    x[100:200] = 0.0
    x[200:300] = (torch.randn(100, generator=gen) * 0.02)  # typical weights
    got, nonzero = published_copy(x.reshape(1000, -1)[:, :1000], torch.bfloat16)  # a strided view too
    want = x.reshape(1000, -1)[:, :1000].to(torch.bfloat16)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert nonzero == int(torch.count_nonzero(want))


def test_other_dtypes_fall_back_to_torch():
    x = torch.tensor([1.5, 0.0, -2.0], dtype=torch.float64)
    got, nonzero = published_copy(x, torch.bfloat16)
    assert torch.equal(got, x.to(torch.bfloat16)) and nonzero == 2
    same = torch.tensor([1, 0, 3], dtype=torch.int64)
    copy, nonzero = published_copy(same, torch.bfloat16)
    assert torch.equal(copy, same) and copy.data_ptr() != same.data_ptr() and nonzero == 2


def test_conversion_into_a_given_buffer():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=gen)
    buf = torch.full((64, 32), 7.0, dtype=torch.bfloat16)
    got, nonzero = published_copy(x, torch.bfloat16, out=buf)
    assert got.data_ptr() == buf.data_ptr()  # written into the buffer, nothing allocated
    assert torch.equal(got.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert nonzero == int(torch.count_nonzero(x.to(torch.bfloat16)))
    ints = torch.tensor([1, 0, 3])
    got, nonzero = published_copy(ints, torch.bfloat16, out=torch.zeros(3, dtype=torch.int64))
    assert torch.equal(got, ints) and nonzero == 2
    for unfit in (torch.empty(32, 64, dtype=torch.bfloat16), torch.empty(64, 32, dtype=torch.float16),
                  torch.empty(32, 64, dtype=torch.bfloat16).T):  # wrong shape, dtype; not contiguous
        got, _ = published_copy(x, torch.bfloat16, out=unfit)
        assert got.data_ptr() != unfit.data_ptr()
        assert torch.equal(got.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_publisher_reuses_its_buffers_and_every_delta_stays_exact():
    """Each publish converts into the buffers of the copy before its base; an abandoned publish
    (staged, partly encoded) gives its buffers back. The base must never be overwritten: it
    always holds exactly the last published weights cast to bf16, and every delta decoded by a
    receiver gives exactly the new weights cast to bf16."""
    from sync.config import SyncConfig
    from sync.publisher import SlicePublisher
    from sync.receiver import WeightReceiver
    from sync.checksum import state_checksum

    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(2048, generator=gen) for k in "abc"}  # 4 KB each in bf16: one part each
    pub = SlicePublisher(SyncConfig(level="fast", part_bytes=4096, bucket_bytes=4096))
    rx = WeightReceiver()
    buffers, published = set(), None
    for version in range(1, 8):
        with torch.no_grad():
            for t in state.values():
                t.add_((torch.rand(t.shape, generator=gen) < 0.05) * torch.randn(t.shape, generator=gen) * 0.05)
        staged = pub.stage(state, version)
        assert len(staged.parts) == 3
        if version == 4:  # abandoned after one part: the driver gave up on it
            pub.encode_part(0, version)
            buffers |= {t.data_ptr() for t in pub._next.values()}
            assert not {t.data_ptr() for t in pub._next.values()} & {t.data_ptr() for t in pub._last.values()}
            assert all(torch.equal(pub._last[k].view(torch.int16), published[k].view(torch.int16)) for k in state)
            continue
        payloads = [pub.encode_part(i, version)[0] for i in range(3)]
        buffers |= {t.data_ptr() for t in pub._last.values()}
        assert not {t.data_ptr() for t in pub._spare.values()} & {t.data_ptr() for t in pub._last.values()}
        published = {k: v.to(torch.bfloat16) for k, v in state.items()}
        assert all(torch.equal(pub._last[k].view(torch.int16), published[k].view(torch.int16)) for k in state)
        kind = "delta" if staged.base_version is not None else "snapshot"
        rx.commit(rx.stage_buckets(payloads, kind, part_keys=staged.parts))
        assert rx.state_checksum() == state_checksum(published), f"version {version}"
    assert len(buffers) <= 3 * len(state)  # two copies in turn, plus the abandoned publish's once


def test_a_part_is_refused_when_the_weights_moved_since_stage():
    """The slice is read when its part is encoded: a rank whose version moved in between (an
    optimizer step) must not publish a mix of two versions."""
    import pytest

    from sync.config import SyncConfig
    from sync.publisher import SlicePublisher

    pub = SlicePublisher(SyncConfig(level="fast"))
    state = {"w": torch.randn(64)}
    pub.stage(state, 3)
    with pytest.raises(ValueError, match="moved to version 4"):
        pub.encode_part(0, version=4)
    buckets, stats = pub.encode_part(0, version=3)
    assert stats.nonzero == int(torch.count_nonzero(state["w"].to(torch.bfloat16))) and set(stats.checksums) == {"w"}


def test_one_thread_stages_deltas_of_several_dtypes():
    """Per-thread scratch arrays are kept per dtype: a bf16 entry staged after an fp32 one on
    the same thread must not be patched in the fp32 entry's array (a valid payload refused)."""
    from sync.codec import encode
    from sync.receiver import WeightReceiver
    from sync.checksum import state_checksum

    gen = torch.Generator().manual_seed(6)
    old = {"f32": torch.randn(5000, generator=gen), "bf16": torch.randn(5000, generator=gen).to(torch.bfloat16),
           "i64": torch.randint(0, 1000, (5000,), generator=gen)}
    new = {k: v.clone() for k, v in old.items()}
    for t in new.values():
        t[::97] += 1
    rx = WeightReceiver({k: v.clone() for k, v in old.items()}, version=1)
    buckets = encode(old, new, base_version=1, target_version=2, level="fast")
    rx.commit(rx.stage_buckets([buckets]))
    assert rx.state_checksum() == state_checksum(new)


def test_a_masked_copy_is_bit_for_bit_the_fp32_product_with_the_mask_cast():
    """published_copy(t, mask=m) gives exactly (t * m.float()).to(bf16): kept elements cast as
    torch casts, dropped ones a zero of their sign (NaN for inf and NaN), without a masked copy."""
    gen = torch.Generator().manual_seed(5)
    bits = torch.randint(-2**31, 2**31 - 1, (400_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -1e-45, -0.5, 0.5], dtype=torch.float32)
    x[: specials.numel()] = specials
    x[8:16] = specials
    x[1000:200_000] = torch.randn(199_000, generator=gen) * 0.02
    mask = torch.rand(x.shape, generator=gen) < 0.5
    mask[:8], mask[8:16] = False, True
    want = (x * mask.to(torch.float32)).to(torch.bfloat16)
    for out in (None, torch.full(x.shape, 3.0, dtype=torch.bfloat16)):
        got, nonzero = published_copy(x, torch.bfloat16, out=out, mask=mask)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert nonzero == int(torch.count_nonzero(want))
    # the torch path (a bf16 working copy, as ZeRO 0-2 with precision bf16 publishes) agrees with
    # multiplying in that dtype
    w = (torch.randn(64, 32, generator=gen) * 0.02).to(torch.bfloat16)
    m = torch.rand(64, 32, generator=gen) < 0.3
    got, nonzero = published_copy(w, torch.bfloat16, mask=m.reshape(-1))
    assert torch.equal(got.view(torch.int16), (w * m.to(torch.bfloat16)).view(torch.int16))
    assert got.data_ptr() != w.data_ptr() and nonzero == int(torch.count_nonzero(w * m))


def test_a_mask_that_does_not_fit_is_a_named_error():
    import pytest

    x = torch.randn(10)
    with pytest.raises(ValueError, match="bool with the tensor's 10 elements"):
        published_copy(x, torch.bfloat16, mask=torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        published_copy(x, torch.bfloat16, mask=torch.ones(10))


def test_a_publisher_given_masks_publishes_the_masked_weights():
    """SlicePublisher.stage(masks=...): receivers get tensor * mask, snapshots and deltas alike,
    and keys without a mask are published as they are."""
    import pytest

    from sync.config import SyncConfig
    from sync.publisher import SlicePublisher
    from sync.receiver import WeightReceiver
    from sync.checksum import state_checksum

    gen = torch.Generator().manual_seed(6)
    state = {"w": torch.randn(256, 64, generator=gen) * 0.02, "b": torch.randn(64, generator=gen)}
    mask = torch.rand(256, 64, generator=gen) < 0.5
    pub = SlicePublisher(SyncConfig(mode="sparse", part_bytes=8192))
    rec = WeightReceiver()
    for version in (1, 2, 3):
        state["w"] += torch.randn(256, 64, generator=gen) * 1e-4
        mask[version] = ~mask[version]  # the mask moves too (RigL-like)
        staged = pub.stage(state, version, masks={"w": mask.reshape(-1)})
        payloads = [pub.encode_part(i, version)[0] for i in range(len(staged.parts))]
        rec.commit(rec.stage_buckets(payloads, kind="delta" if staged.base_version else "snapshot", part_keys=staged.parts))
        want = {"w": (state["w"] * mask).to(torch.bfloat16), "b": state["b"].to(torch.bfloat16)}
        assert rec.version == version and rec.reread_checksum() == state_checksum(want)
    assert pub.standing_bytes() == 2 * (256 * 64 + 64) * 2  # the base and the spare buffers, bf16
    with pytest.raises(ValueError, match="masks for keys"):
        pub.stage(state, 4, masks={"nope": mask})
    with pytest.raises(ValueError, match="must be bool"):
        pub.stage(state, 4, masks={"w": mask.float()})
