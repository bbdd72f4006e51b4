"""Weight sync over the Ray object store: the driver's side of a publish, across trainer ranks.

Every trainer rank publishes its own slice (sync/slices.py) with a SlicePublisher
(sync/publisher.py) and encodes it part by part; each part is the return value of an actor call,
so it lands in the object store of the rank's own node and no rank ever holds the full model.
The driver (ShardedPublisher) keeps only ObjectRefs and small stats:

    begin()          every rank plans its slice's parts and the driver queues one encode call per
                     part (copy to the published dtype, hash, encode): it returns as soon as the
                     ranks have planned, with the parts still encoding, so receivers start
                     fetching part 0 while later parts are copied and encoded (pipelining)
    finish(handle)   waits for every part's stats: payload bytes, encode time, checksums, errors
    update_for(v)    the cheapest update that brings a receiver at version v to the newest one:
                     the latest delta, the chain of deltas it missed, or a snapshot (encoded on
                     demand from the ranks' last published copies), whichever is fewer bytes
    observe(h, s)    the publish took s seconds end to end: feeds the sparse/dense choice
                     (sync/policy.py), made per publish in begin()

Receivers (sync/receiver.py) fetch every rank's parts. Objects of one node are transferred to
another node once and shared by every receiver there (Ray's object manager), so with K receivers
on a node the trainer nodes send each byte to that node once, not K times.
WeightPublisher is the same publisher in one process (a single rank, tests and tools).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from sync.checksum import combine_checksums
from sync.config import SyncConfig
from sync.errors import SyncError, UpdateUnavailableError
from sync.payloads import Part, PublishStats, WeightUpdate
from sync.policy import ModeChooser
from sync.publisher import PartStats, SlicePublisher, StagedSlice


@dataclass
class _Record:
    base_version: int | None
    target_version: int
    parts: list[Part]  # in round-robin order over the ranks (round_robin)
    stats_refs: list  # ... as the parts
    plan: list[list[list[str]]]  # per rank: the keys of each of its parts
    payload_bytes: int | None = None  # resolved by finish()


def round_robin(plan: list[list[list[str]]]) -> list[tuple[int, int, list[str]]]:
    """(rank, part index, keys) of every part, part 0 of every rank first, then every part 1...:
    the order in which the ranks, encoding in parallel, finish them, so a receiver working
    through the parts in order never waits on one rank while another's parts are ready."""
    return [(r, i, parts[i]) for i in range(max(map(len, plan), default=0)) for r, parts in enumerate(plan) if i < len(parts)]


@dataclass
class PublishHandle:
    version: int
    dense: bool
    record: _Record
    staged: list[StagedSlice]
    dense_bytes: int
    checksum: str | None = None  # of the published state, once finish() has the parts' stats


# ---------------------------------------------------------------- rank channels


class ActorChannel:
    """A trainer rank actor that exposes `sync_stage(dense)`, `sync_encode(i)` and
    `sync_snapshot(i)` (trainer/algos/rl_worker.py): calls return ObjectRefs at once."""

    def __init__(self, handle):
        self.handle = handle

    def stage(self, dense: bool):
        return self.handle.sync_stage.remote(dense)

    def encode(self, index: int):
        return self.handle.sync_encode.options(num_returns=2).remote(index)

    def snapshot(self, index: int):
        return self.handle.sync_snapshot.options(num_returns=2).remote(index)


class LocalChannel:
    """A SlicePublisher in this process; results are put into the object store here."""

    def __init__(self, publisher: SlicePublisher):
        self.publisher = publisher
        self.state: dict[str, torch.Tensor] = {}
        self.version = 0

    def stage(self, dense: bool):
        import ray

        return ray.put(self.publisher.stage(self.state, self.version, dense))

    def _put(self, result: tuple[list[bytes], PartStats]):
        import ray

        return ray.put(result[0]), ray.put(result[1])

    def encode(self, index: int):
        return self._put(self.publisher.encode_part(index, self.version))

    def snapshot(self, index: int):
        return self._put(self.publisher.snapshot_part(index))


# ---------------------------------------------------------------- the driver's publisher


class ShardedPublisher:
    def __init__(self, channels: list, cfg: SyncConfig | None = None):
        self.cfg = cfg or SyncConfig()
        self.chooser = ModeChooser(self.cfg.mode)
        self.reconnect(channels)

    def reconnect(self, channels: list) -> None:
        """Publish through `channels` from now on, e.g. the ranks of a restarted trainer group:
        what the old ranks published died with them, so nothing published before is offered
        (receivers get a full send of the next publish); the sparse/dense choice keeps what it
        has measured."""
        self.channels = channels
        self.version: int | None = None
        self._history: deque[_Record] = deque(maxlen=max(1, self.cfg.history))
        self._snapshot: _Record | None = None
        self._checksums: dict[str, str] = {}
        self._dense_bytes = 0
        self._open: PublishHandle | None = None
        self._force_dense = False  # after a failed publish the ranks' bases may differ

    def begin(self) -> PublishHandle:
        import ray

        if self._open is not None:
            self.finish(self._open)
        dense = self._force_dense or self.chooser.choose(self._dense_bytes)
        try:
            staged: list[StagedSlice] = ray.get([c.stage(dense) for c in self.channels], timeout=self.cfg.fetch_timeout_s)
        except ray.exceptions.GetTimeoutError as e:  # a rank that hangs: nothing of this version exists yet
            self._force_dense = True
            raise UpdateUnavailableError(f"a trainer rank did not stage its slice for publishing within "
                                         f"{self.cfg.fetch_timeout_s} s (sync.fetch_timeout_s)") from e
        except ray.exceptions.RayError as e:  # a rank that died or failed while staging
            self._force_dense = True
            raise UpdateUnavailableError(f"a trainer rank failed to stage its slice for publishing: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
        versions = {s.version for s in staged}
        bases = {s.base_version for s in staged}
        if len(versions) != 1 or len(bases) != 1:
            self._force_dense = True
            raise SyncError(f"trainer ranks staged different versions {sorted(versions)} / bases {bases}; "
                            "the next publish is a full one")
        version, base = staged[0].version, staged[0].base_version
        parts, stats_refs = [], []
        plan = [s.parts for s in staged]
        for r, i, keys in round_robin(plan):
            buckets_ref, stats_ref = self.channels[r].encode(i)
            parts.append(Part(list(keys), buckets_ref))
            stats_refs.append(stats_ref)
        record = _Record(base, version, parts, stats_refs, plan)
        # A chain stops at a full send, so an older one in the history only pins its parts in
        # the object store (up to `history` full sends in dense mode): only the newest stays.
        for old in [r for r in self._history if r.base_version is None]:
            self._history.remove(old)
        self._history.append(record)
        self._snapshot = record if base is None else None
        self.version = version
        self._dense_bytes = sum(s.dense_bytes for s in staged)
        self._force_dense = False
        self._open = PublishHandle(version, base is None and dense, record, staged, self._dense_bytes)
        return self._open

    def finish(self, handle: PublishHandle) -> PublishStats:
        """Wait until every part of `handle`'s version is encoded; its stats. A part that failed
        (or a rank that died) raises UpdateUnavailableError; the next publish is then dense."""
        import ray

        try:
            stats: list[PartStats] = ray.get(handle.record.stats_refs, timeout=self.cfg.fetch_timeout_s)
        except Exception as e:
            # The ranks' bases may now differ (some finished, some not): no update is handed out
            # for this version, and the next publish is a full one on every rank.
            self._force_dense = True
            if self._open is handle:
                self._open = None
            if handle.record in self._history:
                self._history.remove(handle.record)
            if self._snapshot is handle.record:
                self._snapshot = None
            raise UpdateUnavailableError(f"publish of version {handle.version} failed on a trainer rank: "
                                         f"{type(e).__name__}: {e}") from e
        if self._open is handle:
            self._open = None
        record = handle.record
        record.payload_bytes = sum(s.payload_bytes for s in stats)
        self._trim_history()
        checksums = {k: v for s in stats for k, v in s.checksums.items()}
        handle.checksum = combine_checksums(checksums)
        if record.target_version == self.version:
            self._checksums = checksums
        per_rank: dict[int, float] = {}
        for (r, _, _), s in zip(round_robin(record.plan), stats):
            per_rank[r] = per_rank.get(r, 0.0) + s.encode_s
        nonzero = sum(s.nonzero for s in stats)
        numel = sum(s.numel for s in handle.staged)
        return PublishStats(
            version=handle.version, kind="snapshot" if record.base_version is None else "delta", dense=handle.dense,
            payload_bytes=record.payload_bytes, dense_bytes=handle.dense_bytes,
            ratio=handle.dense_bytes / max(1, record.payload_bytes), changed=sum(p.changed for p in stats), encode_s=max(per_rank.values(), default=0.0),
            parts=len(record.parts), checksum=handle.checksum, density=nonzero / max(1, numel),
        )

    def _trim_history(self) -> None:
        """Drop the oldest deltas while the older ones together outweigh a full send: a chain
        is handed out only when it is smaller than a snapshot, so they could never be used. So
        the history pins at most one full send of older deltas plus the newest version, and a
        snapshot encoded for a late receiver one more until the next publish, whatever
        `sync.history` says."""
        while len(self._history) > 1:
            older = list(self._history)[:-1]
            if sum(r.payload_bytes or 0 for r in older) <= self._dense_bytes:
                break
            self._history.popleft()

    def pinned_bytes(self) -> int:
        """Payload bytes the publisher keeps referenced in the object store (so Ray cannot free
        them): the history's versions and a snapshot encoded for late receivers (finished ones;
        a publish still encoding counts once finished)."""
        records = {id(r): r for r in self._history}
        if self._snapshot is not None:
            records[id(self._snapshot)] = self._snapshot
        return sum(r.payload_bytes or 0 for r in records.values())

    def observe(self, handle: PublishHandle, seconds: float) -> None:
        """`handle`'s publish took `seconds` from begin() to the last receiver's commit."""
        self.chooser.observe(handle.dense, seconds, handle.dense_bytes)

    def publish(self) -> PublishStats:
        """begin() + finish(): encode everything (no receiver overlap)."""
        return self.finish(self.begin())

    # -- updates for receivers ----------------------------------------------------------------

    def update_for(self, receiver_version: int | None) -> WeightUpdate:
        """The cheapest update that brings a receiver at `receiver_version` to the latest version."""
        update = self._update_for(receiver_version)
        update.fetch_timeout_s = self.cfg.fetch_timeout_s
        update.fetch_attempts = self.cfg.fetch_attempts
        return update

    def _update_for(self, receiver_version: int | None) -> WeightUpdate:
        if self.version is None or receiver_version == self.version:
            return WeightUpdate("none", receiver_version, receiver_version, 0)
        if not self._history or self._history[-1].target_version != self.version:
            raise UpdateUnavailableError(f"version {self.version} failed to publish; the next publish brings receivers up to date")
        chain: list[_Record] = []
        if receiver_version is not None:
            want = self.version
            for rec in reversed(self._history):
                if rec.target_version != want or rec.base_version is None:
                    break
                chain.append(rec)
                want = rec.base_version
                if want == receiver_version:
                    break
            if want != receiver_version:
                chain = []
        chain.reverse()
        if len(chain) == 1:
            rec = chain[0]
            return WeightUpdate("delta", rec.base_version, rec.target_version, rec.payload_bytes or 0, [list(rec.parts)])
        snap = self._snapshot_now()
        chain_bytes = sum(self._size(r) for r in chain)
        if chain and chain_bytes < self._size(snap):
            return WeightUpdate("chain", receiver_version, self.version, chain_bytes, [list(r.parts) for r in chain])
        return WeightUpdate("snapshot", None, self.version, snap.payload_bytes or 0, [list(snap.parts)])

    def updates_for(self, receiver_versions: list[int | None]) -> dict[int | None, WeightUpdate]:
        """update_for each of `receiver_versions` (async offers: a worker may be at any of them)."""
        return {v: self.update_for(v) for v in receiver_versions}

    def _size(self, rec: _Record) -> int:
        import ray

        if rec.payload_bytes is None:
            try:
                rec.payload_bytes = sum(s.payload_bytes for s in ray.get(rec.stats_refs, timeout=self.cfg.fetch_timeout_s))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
                raise UpdateUnavailableError(f"version {rec.target_version}'s parts could not be sized: "
                                             f"{type(e).__name__}") from e
        return rec.payload_bytes

    def _snapshot_now(self) -> _Record:
        if self._snapshot is not None and self._snapshot.target_version == self.version:
            return self._snapshot
        assert self.version is not None, "a snapshot of a version that was published"
        plan = self._history[-1].plan
        parts, stats_refs = [], []
        for r, i, keys in round_robin(plan):
            buckets_ref, stats_ref = self.channels[r].snapshot(i)
            parts.append(Part(list(keys), buckets_ref))
            stats_refs.append(stats_ref)
        self._snapshot = _Record(None, self.version, parts, stats_refs, plan)
        return self._snapshot

    def state_checksum(self) -> str:
        """Checksum of the latest published (published-dtype) state, over all ranks' slices
        (known once that publish is finished)."""
        return combine_checksums(self._checksums)


class WeightPublisher:
    """The publisher in one process: a single rank whose slice is the whole state."""

    def __init__(self, cfg: SyncConfig | None = None):
        self.cfg = cfg or SyncConfig(mode="sparse")
        self.slice = SlicePublisher(self.cfg)
        self._channel = LocalChannel(self.slice)
        self._sharded = ShardedPublisher([self._channel], self.cfg)

    @property
    def version(self) -> int | None:
        return self._sharded.version

    def publish(self, state: dict[str, torch.Tensor], version: int) -> PublishStats:
        self._channel.state, self._channel.version = state, version
        return self._sharded.publish()

    def update_for(self, receiver_version: int | None) -> WeightUpdate:
        return self._sharded.update_for(receiver_version)

    def updates_for(self, receiver_versions: list[int | None]) -> dict[int | None, WeightUpdate]:
        return self._sharded.updates_for(receiver_versions)

    def state_checksum(self) -> str:
        return self._sharded.state_checksum()

    def pinned_bytes(self) -> int:
        return self._sharded.pinned_bytes()

