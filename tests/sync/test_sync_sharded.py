"""Sharded publish: two trainer ranks each publish their slice (sync/slices.py) part by part, and
receivers put the slices back together, bit-exact, over deltas, chains and snapshots."""
from __future__ import annotations

import pytest
import torch

from sync.config import SyncConfig
from sync.errors import SyncError, TensorMismatchError, UpdateUnavailableError
from sync.policy import ModeChooser
from sync.publisher import SlicePublisher
from sync.receiver import WeightReceiver
from sync.slices import parse_key, slice_range, take_slice, target_views
from sync.checksum import state_checksum
from sync.payloads import Part, WeightUpdate
from sync.transport import LocalChannel, ShardedPublisher

WORLD = 2


def test_slice_ranges_tile_every_tensor_like_zero3_partitions():
    for numel in (0, 1, 2, 3, 7, 64, 1001):
        for world in (1, 2, 3, 4):
            per = -(-numel // world)  # DeepSpeed ZeRO-3's partition size: ceil(numel / world)
            ranges = [slice_range(numel, r, world) for r in range(world)]
            covered = [i for a, b in ranges for i in range(a, b)]
            assert covered == list(range(numel))
            assert all(b - a <= per for a, b in ranges)
            assert all(a == min(numel, r * per) for r, (a, _) in enumerate(ranges))


def test_slice_keys_round_trip_and_views_write_into_the_target():
    t = torch.zeros(3, 5)
    keys = [take_slice("w", t, r, 2)[0] for r in range(2)]
    assert keys == ["w[0:8]", "w[8:15]"]
    assert parse_key(keys[1]) == ("w", 8, 15) and parse_key("w") == ("w", None, None)
    views = target_views({"w": t}, keys)
    views["w[8:15]"].fill_(1)
    assert t.view(-1)[8:].eq(1).all() and t.view(-1)[:8].eq(0).all()
    with pytest.raises(TensorMismatchError, match="do not tile"):
        target_views({"w": t}, ["w[0:8]"])
    with pytest.raises(TensorMismatchError, match="outside"):
        target_views({"w": t}, ["w[0:8]", "w[8:16]"])


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(97, 64, generator=g), "blk.w": torch.randn(33, 64, generator=g),
            "blk.b": torch.randn(33, generator=g), "norm": torch.ones(64), "empty": torch.zeros(0)}


def _step(state: dict[str, torch.Tensor], seed: int, frac: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + (torch.rand(v.shape, generator=g) < frac) * 0.05 * torch.randn(v.shape, generator=g)
            for k, v in state.items()}


class _Ranks:
    """WORLD in-process ranks, each publishing its slice of a full fp32 state."""

    def __init__(self, cfg: SyncConfig):
        self.channels = [LocalChannel(SlicePublisher(cfg)) for _ in range(WORLD)]
        self.publisher = ShardedPublisher(self.channels, cfg)

    def publish(self, state: dict[str, torch.Tensor], version: int):
        for r, ch in enumerate(self.channels):
            ch.state = dict(s for name, t in state.items() if (s := take_slice(name, t, r, WORLD)) is not None)
            ch.version = version
        return self.publisher.publish()


@pytest.mark.ray
def test_two_ranks_publish_slices_and_receivers_end_bit_identical(ray_cluster):
    cfg = SyncConfig(level="fast", mode="sparse", history=3, part_bytes=4096, bucket_bytes=4096)
    ranks = _Ranks(cfg)
    state = _model_state(0)
    target = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in state.items()}
    lagging_target = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in state.items()}
    rec, lag = WeightReceiver(target), WeightReceiver(lagging_target)
    kinds, lag_kinds = [], []
    for version in range(8):
        if version:
            state = _step(state, version)
        stats = ranks.publish(state, version)
        assert stats.parts > WORLD  # several parts per rank: receivers can pipeline
        published = {k: v.to(torch.bfloat16) for k, v in state.items()}
        # the publisher's checksum over both ranks' slices is the receiver's over its views
        kinds.append(rec.apply(ranks.publisher.update_for(rec.version)).kind)
        assert rec.version == version and rec.state_checksum() == ranks.publisher.state_checksum()
        for k in published:  # an independent check: the target tensors equal the bf16 cast bit for bit
            assert torch.equal(target[k].view(torch.int16), published[k].view(torch.int16)), k
        if version in (2, 7):
            lag_kinds.append(lag.apply(ranks.publisher.update_for(lag.version)).kind)
            assert all(torch.equal(lagging_target[k].view(torch.int16), published[k].view(torch.int16)) for k in published)
    assert kinds == ["snapshot"] + ["delta"] * 7
    assert lag_kinds[0] == "snapshot" and lag_kinds[1] in ("chain", "snapshot")
    assert ranks.publisher.state_checksum() == state_checksum(
        {k: v for r in range(WORLD) for k, v in ranks.channels[r].publisher.last_published().items()})


@pytest.mark.ray
def test_a_bad_or_missing_part_leaves_weights_and_version_untouched(ray_cluster):
    import ray

    cfg = SyncConfig(level="fast", mode="sparse", part_bytes=4096, bucket_bytes=4096)
    ranks = _Ranks(cfg)
    state = _model_state(1)
    ranks.publish(state, 0)
    target = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in state.items()}
    rec = WeightReceiver(target, fetch_timeout_s=2.0)
    rec.apply(ranks.publisher.update_for(None))
    before = {k: v.clone() for k, v in target.items()}
    checksum = rec.state_checksum()
    ranks.publish(_step(state, 5, frac=0.3), 1)
    good = ranks.publisher.update_for(0)
    parts = good.steps[0]

    def with_part(i: int, part: Part) -> WeightUpdate:
        return WeightUpdate(good.kind, 0, 1, good.payload_bytes, [parts[:i] + [part] + parts[i + 1:]])

    last = len(parts) - 1  # fails only after every other part was decoded into the shadow
    buckets = list(ray.get(parts[last].ref))
    flipped = bytearray(buckets[0])
    flipped[len(flipped) // 2] ^= 1
    never = ray.remote(lambda: __import__("time").sleep(60)).remote()  # a stalled link / rank
    cases = {
        "corrupt": (with_part(last, Part(parts[last].keys, ray.put([bytes(flipped)] + buckets[1:]))), SyncError),
        "stalled": (with_part(last, Part(parts[last].keys, never)), UpdateUnavailableError),
        "missing part": (WeightUpdate("delta", 0, 1, 0, [parts[:-1]]), TensorMismatchError),
        "mislabelled": (with_part(last, Part(parts[0].keys, parts[last].ref)), SyncError),
    }
    for name, (update, error) in cases.items():
        with pytest.raises(error):
            rec.apply(update)
        assert rec.version == 0 and rec.state_checksum() == checksum, name
        assert all(torch.equal(target[k], before[k]) for k in target), name
    ray.cancel(never, force=True)
    rec.apply(good)
    assert rec.version == 1 and rec.state_checksum() == ranks.publisher.state_checksum()


def test_mode_chooser_picks_the_faster_measured_path():
    c = ModeChooser("auto")
    assert c.choose(1000) is True  # first publish: a full send measures the link
    c.observe(True, 2.0, 1000)  # dense: 2 ms per byte
    assert c.choose(1000) is False  # no sparse measurement yet: try sparse
    c.observe(False, 0.5, 1000)
    assert c.choose(1000) is False  # sparse 0.5 s < dense 2 s
    c.observe(False, 3.5, 1000)  # sparse got slow (dense deltas): EMA 2.0 ...
    c.observe(False, 3.5, 1000)  # ... 2.75 > 2.0 predicted for dense
    assert c.choose(1000) is True
    assert ModeChooser("sparse").choose(1) is False and ModeChooser("dense").choose(1) is True
    # without measurements (a caller that never reports times) auto stays sparse after the first
    quiet = ModeChooser("auto")
    assert [quiet.choose(1) for _ in range(3)] == [True, False, False]


class _SlowRank:
    """A trainer rank actor exposing the ActorChannel protocol over a fixed state; its encode of
    part 1 and later takes a while, so it can be killed mid-publish."""

    def __init__(self, rank: int, cfg: SyncConfig):
        self.rank, self.pub, self.version = rank, SlicePublisher(cfg), -1

    def sync_stage(self, dense: bool):
        self.version += 1
        state = _step(_model_state(2), self.version) if self.version else _model_state(2)
        return self.pub.stage(dict(s for n, t in state.items() if (s := take_slice(n, t, self.rank, WORLD))), self.version, dense)

    def sync_encode(self, index: int):
        if self.version and index:
            __import__("time").sleep(3)
        return self.pub.encode_part(index)

    def sync_snapshot(self, index: int):
        return self.pub.snapshot_part(index)


@pytest.mark.ray
def test_a_trainer_rank_dying_mid_publish_is_a_typed_error_and_no_partial_commit(ray_cluster):
    import sys

    import ray
    import ray.cloudpickle

    from sync.transport import ActorChannel

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = SyncConfig(level="fast", mode="sparse", part_bytes=4096, bucket_bytes=4096, fetch_timeout_s=30)
    ranks = [ray.remote(num_cpus=0.1)(_SlowRank).remote(r, cfg) for r in range(WORLD)]
    publisher = ShardedPublisher([ActorChannel(r) for r in ranks], cfg)
    publisher.publish()
    target = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in _model_state(2).items()}
    rec = WeightReceiver(target, fetch_timeout_s=30)
    rec.apply(publisher.update_for(None))
    before, checksum = {k: v.clone() for k, v in target.items()}, rec.state_checksum()
    handle = publisher.begin()  # rank 1 is still encoding its later parts when it dies
    update = publisher.update_for(0)
    ray.kill(ranks[1])
    with pytest.raises(UpdateUnavailableError):
        rec.apply(update)
    assert rec.version == 0 and rec.state_checksum() == checksum
    assert all(torch.equal(target[k], before[k]) for k in target)
    with pytest.raises(UpdateUnavailableError, match="version 1"):
        publisher.finish(handle)
    with pytest.raises(UpdateUnavailableError, match="failed to publish"):
        publisher.update_for(0)  # the broken version is not handed out again
    assert publisher._force_dense  # the next publish is a full one on every rank
    ray.kill(ranks[0])


@pytest.mark.ray
def test_an_update_creating_more_bytes_than_the_target_holds_is_refused_before_decoding(ray_cluster):
    from sync.errors import LimitError
    from sync.transport import WeightPublisher

    pub = WeightPublisher(SyncConfig(level="fast", mode="sparse"))
    pub.publish({"w": torch.randn(64, 1024)}, 0)  # 128 KiB of bf16
    target = {"w": torch.zeros(4, 16, dtype=torch.bfloat16)}  # 128 bytes: floor of 4 KiB
    rec = WeightReceiver(target)
    with pytest.raises(LimitError):
        rec.apply(pub.update_for(None))
    assert rec.version is None and target["w"].eq(0).all()


def _simulate(c: ModeChooser, times, publishes: int, start: int = 0) -> list[bool]:
    """`publishes` decisions of `c`, each fed the time `times(i, dense)` of what it chose."""
    picks = []
    for i in range(start, start + publishes):
        picks.append(c.choose(1000))
        c.observe(picks[-1], times(i, picks[-1]), 1000)
    return picks


def test_mode_chooser_reprobes_the_mode_not_in_use_on_a_budget_and_never_locks_in():
    from sync.policy import PROBE_BUDGET, PROBE_MAX_EVERY, PROBE_MIN_EVERY

    def probes(dense_s: float, sparse_s: float, publishes: int) -> list[int]:
        c = ModeChooser("auto")
        picks = _simulate(c, lambda i, d: dense_s if d else sparse_s, publishes)
        loser = dense_s >= sparse_s
        return [i for i, p in enumerate(picks) if i >= 2 and p == loser]

    # dense at 1.5x sparse: the 0.5 s a probe costs is within budget after PROBE_MIN_EVERY publishes
    got = probes(1.5, 1.0, 60)
    assert got and all(b - a == PROBE_MIN_EVERY + 1 for a, b in zip(got, got[1:]))
    # a slow link (dense 10x sparse): probed, but only once 9 s are <= 10 % of the time since
    every = round(9.0 / (PROBE_BUDGET * 1.0))
    got = probes(10.0, 1.0, 400)
    assert len(got) >= 3 and all(b - a == every + 1 for a, b in zip(got, got[1:]))
    # however slow the other mode is predicted to be, it is measured again within PROBE_MAX_EVERY
    got = probes(1e6, 1.0, PROBE_MAX_EVERY + 5)
    assert got == [PROBE_MAX_EVERY + 1]
    # and symmetrically: while dense wins, sparse is measured again too
    got = probes(1.0, 1.5, 60)
    assert len(got) >= 4


def test_mode_chooser_follows_a_link_that_changes_either_way():
    """Dense wins on a fast link; the link slows 20x: dense's estimate follows and sparse takes
    over within two publishes. The link becomes fast again while sparse is in use (sparse times
    do not show it): the scheduled probe of dense finds it."""
    c = ModeChooser("auto")
    fast = lambda i, d: 1.0 if d else 2.0  # noqa: E731
    slow = lambda i, d: 20.0 if d else 2.0  # noqa: E731
    picks = _simulate(c, fast, 20)
    assert picks[:2] == [True, False] and sum(not p for p in picks[2:]) <= 2  # dense, bar scheduled probes
    picks = _simulate(c, slow, 30)
    assert sum(picks) <= 2 and not any(picks[picks.index(False):])
    picks = _simulate(c, fast, 400)
    first_dense = picks.index(True)
    assert first_dense < 200 and all(picks[first_dense + 1:first_dense + 10])
    # a caller that knows the link changed: both are measured again before either is trusted
    c.conditions_changed()
    assert c.choose(1000) is False
    c.observe(False, 2.0, 1000)
    assert c.choose(1000) is True


def test_mode_chooser_measures_the_other_mode_at_once_when_conditions_shift():
    """Dense in use (1 s) against a sparse estimate of 5 s; then full sends take 2.5 s and
    sparse ones 1 s (the link slowed, the updates got sparser). Dense still looks better than the
    stale sparse estimate, but two measurements SHIFT off their estimate say the conditions
    changed: sparse is measured at the next publish, and wins from then on."""
    c = ModeChooser("auto")
    before = lambda i, d: 1.0 if d else 5.0  # noqa: E731
    after = lambda i, d: 2.5 if d else 1.0  # noqa: E731
    assert _simulate(c, before, 2) == [True, False]
    c.since = {"dense": 0, "sparse": 0}
    picks = _simulate(c, after, 6)
    assert picks[:3] == [True, True, False] and not any(picks[3:]) and c.shifts == 1


@pytest.mark.ray
def test_a_part_that_arrives_late_is_waited_for_again_up_to_the_attempts(ray_cluster):
    """A stalled part (a link that stops, then comes back): each wait of fetch_timeout_s that
    times out is made again, so the update lands when the part does; once every attempt timed
    out it is a typed error, the weights untouched."""
    import ray

    from sync.transport import WeightPublisher

    state = _model_state(2)
    pub = WeightPublisher(SyncConfig(mode="sparse"))
    pub.publish(state, 1)
    good = pub.update_for(None)
    (part,) = good.steps[0]
    buckets = ray.get(part.ref)
    late = lambda delay: ray.remote(lambda b: (__import__("time").sleep(delay), b)[1]).remote(buckets)  # noqa: E731
    target = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in state.items()}
    rec = WeightReceiver(target)
    stalled = late(30)
    with pytest.raises(UpdateUnavailableError, match="2 wait"):
        rec.apply(WeightUpdate("snapshot", None, 1, 0, [[Part(part.keys, stalled)]], fetch_timeout_s=0.5, fetch_attempts=2))
    ray.cancel(stalled, force=True)
    assert rec.version is None and all(t.eq(0).all() for t in target.values())
    rec.apply(WeightUpdate("snapshot", None, 1, 0, [[Part(part.keys, late(3))]], fetch_timeout_s=1.0, fetch_attempts=20))
    assert rec.version == 1 and rec.reread_checksum() == pub.state_checksum()
