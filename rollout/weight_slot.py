"""A rollout worker's weights: the committed version its engine computes with, and the update on
its way in.

Weights arrive through a sync WeightReceiver (sync/receiver.py) whose target is the engine's
committed weights in checkpoint coordinates (`engine.weights()`); after every commit the engine
is handed the tensors that changed (`engine.load_weights`). An engine that fails there may hold
a mix of two versions: the slot then refuses every call (EngineUpdateError) until the driver
rebuilds the worker from a snapshot.
- sync mode: `apply(update)` downloads, decodes and swaps in one call; on a node with several
  workers one of them `stage_shared`s the update and `commit_shared`s it, the others
  `apply_shared` its staging (decoded once per node);
- async mode: `offer(candidates)` returns at once and a background thread downloads and decodes
  into a staging copy; `swap_in` (called by generate) commits it. Only that swap pauses
  generation; its duration is `pause_s`, apart from the fetch time `fetch_s`.

Every commit returns the receiver's SyncStats (sync/payloads.py) with the slot's own timings
filled in.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from rollout.engine import EngineUpdateError, RolloutEngine
from rollout.results import WeightCheck
from sync.errors import CorruptBucketError, SyncError, TensorMismatchError, VersionMismatchError
from sync.payloads import SyncStats, WeightUpdate
from sync.receiver import SharedUpdate, StagedUpdate, WeightReceiver

log = logging.getLogger(__name__)


class WeightSlot:
    def __init__(self, engine: RolloutEngine, worker_id: int):
        self.engine, self.worker_id = engine, worker_id
        self.receiver = WeightReceiver(target=engine.weights(), version=None)
        self._engine_failure: str | None = None  # set when the engine failed to take a commit
        # fetch (shadow decode) and commit (shadow -> target) must not interleave; they rarely
        # meet, since updates are offered after a batch has started and swapped at the next one.
        self._receiver_lock = threading.Lock()
        self._update_lock = threading.Lock()  # one offer/apply at a time (they join the fetch thread)
        self._lock = threading.Lock()  # guards the staged slot below
        self._fetched = threading.Condition(self._lock)  # notified when a fetch ends (any outcome)
        self._staged: StagedUpdate | None = None  # async: fetched, verified, waiting to be swapped in
        self._no_update = False  # the last offer had nothing for this slot's version
        self._fetch_s = 0.0
        self._fetch_error: BaseException | None = None
        self._fetch_thread: threading.Thread | None = None
        self._shared_staged: StagedUpdate | None = None  # sync mode: staged by stage_shared for the node
        self._shared_fetch_s = 0.0

    @property
    def version(self) -> int | None:
        return self.receiver.version

    def state_checksum(self) -> str:
        return self.receiver.state_checksum()

    def verify(self) -> WeightCheck:
        """The committed weights digested from their bits now (not from digests cached at commit),
        and what the engine computes with them (its own copy, when it keeps one) against a
        reference computed from them."""
        self.check_engine()
        with self._receiver_lock:
            version, checksum = self.receiver.version, self.receiver.reread_checksum()
            diff = self.engine.logprob_diff_vs_committed() if version is not None else None
        return WeightCheck(version, checksum, diff)

    def committed_copy(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the committed weights (what the engine was handed)."""
        with self._receiver_lock:
            return {k: v.detach().cpu().clone() for k, v in self.engine.weights().items()}

    def check_engine(self) -> None:
        if self._engine_failure is not None:
            raise EngineUpdateError(f"rollout worker {self.worker_id}: its engine failed to load the weights of "
                                    f"{self._engine_failure}; it must be rebuilt from a snapshot")

    # -- sync mode -------------------------------------------------------------------------------

    def apply(self, update: WeightUpdate) -> SyncStats:
        """Download + decode + swap now."""
        with self._sync_update():
            started = time.perf_counter()
            with self._receiver_lock:
                stats = self._commit(self.receiver.fetch(update))
            return replace(stats, sync_s=time.perf_counter() - started)

    def stage_shared(self, update: WeightUpdate) -> SharedUpdate:
        """Fetch and verify `update` and keep it staged (commit with commit_shared); returns it
        for the node's other slots (apply_shared), which then neither download nor decode it."""
        with self._sync_update():
            started = time.perf_counter()
            with self._receiver_lock:
                self._shared_staged = self.receiver.fetch(update)
                self._shared_fetch_s = time.perf_counter() - started
                return self.receiver.share(self._shared_staged)

    def commit_shared(self) -> SyncStats:
        """Swap in what stage_shared staged."""
        with self._update_lock, self._receiver_lock:
            started = time.perf_counter()
            staged, self._shared_staged = self._shared_staged, None
            if staged is None:
                raise SyncError("commit_shared without a staged update (stage_shared failed or ran elsewhere)")
            stats = self._commit(staged)
            return replace(stats, sync_s=self._shared_fetch_s + time.perf_counter() - started)

    def apply_shared(self, shared: SharedUpdate, update: WeightUpdate) -> SyncStats:
        """Commit an update another slot on this node staged (stage_shared); when these weights
        are not the ones it was staged against, fetch `update` itself."""
        with self._sync_update():
            started = time.perf_counter()
            with self._receiver_lock:
                try:
                    staged = self.receiver.adopt(shared)
                except (TensorMismatchError, VersionMismatchError, CorruptBucketError):
                    # not this receiver's base, or a shared staging that does not reproduce its own
                    # digests on intact weights: fetch and verify the update itself (a target found
                    # altered raises CorruptTargetError instead: the driver resyncs it by snapshot)
                    stats = self._commit(self.receiver.fetch(update))
                else:
                    stats = replace(self._commit(staged), shared=True)
            return replace(stats, sync_s=time.perf_counter() - started)

    @contextlib.contextmanager
    def _sync_update(self) -> Iterator[None]:
        """A sync-mode update: one at a time, after any background fetch, and superseding
        whatever an offer staged (failed ones included)."""
        with self._update_lock:
            self._wait_fetch()
            with self._lock:
                self._staged, self._fetch_error = None, None
            yield

    def _commit(self, staged: StagedUpdate) -> SyncStats:
        """Commit a verified update into the receiver's target, then hand the engine the tensors
        it changed. An engine that fails to take them may hold a mix of two versions: the slot
        then refuses every call until it is rebuilt from a snapshot (EngineUpdateError)."""
        self.check_engine()
        names = staged.changed_tensors()
        stats = self.receiver.commit(staged)
        started = time.perf_counter()
        try:
            self.engine.load_weights(names)
        except Exception as e:  # noqa: BLE001 - whatever the engine raised, the worker is now unusable
            self._engine_failure = (f"version {stats.version}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}")
            log.error("rollout worker %d: engine failed to load %s", self.worker_id, self._engine_failure)
            self.check_engine()
        return replace(stats, engine_load_s=time.perf_counter() - started)

    # -- async mode ------------------------------------------------------------------------------

    def offer(self, candidates: dict[int | None, WeightUpdate]) -> None:
        """Fetch the newest weights in the background; `swap_in` commits them.

        `candidates` maps a base version to the WeightUpdate that brings a receiver at that
        version to the newest one (the driver cannot know whether an earlier offer was swapped
        in yet). Nothing matching this slot's version: nothing is staged, the worker keeps
        generating with its weights, and the driver resyncs it when its samples get too stale.
        """
        with self._update_lock:
            self._wait_fetch()
            with self._lock:  # an older staged update must not be swapped in under a newer fetch
                self._staged = None
                self._no_update = False

            def fetch() -> None:
                try:
                    started = time.perf_counter()
                    with self._receiver_lock:
                        update = candidates.get(self.receiver.version)
                        staged = None if update is None else self.receiver.fetch(update)
                    with self._lock:
                        self._staged = staged
                        self._no_update = staged is None
                        self._fetch_s = time.perf_counter() - started
                        self._fetched.notify_all()
                except BaseException as e:  # surfaced by the next swap_in, never swallowed
                    with self._lock:
                        self._fetch_error = e
                        self._fetched.notify_all()

            self._fetch_thread = threading.Thread(target=fetch, name=f"weight-fetch-{self.worker_id}", daemon=True)
            self._fetch_thread.start()

    def swap_in(self, min_version: int | None = None, timeout_s: float = 10.0) -> SyncStats | None:
        """Commit an offered update if one is fetched (None: nothing to swap in). With
        `min_version` (the staleness bound of the batch about to start), keep swapping in offered
        updates until the version reaches it, waiting for an in-flight fetch at most `timeout_s`
        (`weights_wait_s`)."""
        if min_version is None:
            return self._commit_staged()
        started = time.perf_counter()
        stats = self._commit_staged()
        while self.receiver.version is not None and self.receiver.version < min_version:
            with self._fetched:
                if self._staged is None and self._fetch_error is None:
                    if self._no_update:
                        break  # nothing on the way: the driver resyncs this worker
                    remaining = started + timeout_s - time.perf_counter()
                    if remaining <= 0 or not self._fetched.wait(remaining):
                        break
            stats = self._commit_staged() or stats
        return None if stats is None else replace(stats, weights_wait_s=time.perf_counter() - started)

    def _wait_fetch(self) -> None:
        if self._fetch_thread is not None:
            self._fetch_thread.join()
            self._fetch_thread = None

    def _commit_staged(self) -> SyncStats | None:
        """Swap in a fetched update if one is ready (the only pause generation sees)."""
        with self._lock:
            error, self._fetch_error = self._fetch_error, None
            staged, self._staged = self._staged, None
            fetch_s = self._fetch_s
        if error is not None:
            raise error
        if staged is None:
            return None
        started = time.perf_counter()
        with self._receiver_lock:
            try:
                stats = self._commit(staged)
            except SyncError:  # superseded: a newer fetch already rolled this one back
                return None
        return replace(stats, pause_s=time.perf_counter() - started, fetch_s=fetch_s)
