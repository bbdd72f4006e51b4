"""The rollout actor group: K RolloutWorker actors, their weight versions, and their replacement.

The driver sees coarse calls (`generate_all`, `apply_all`, `launch`/`collect`/`offer` for async
mode). Weight updates come from an UpdateSource the driver owns (its ShardedPublisher,
sync/transport.py): the group asks it for the update that brings a worker from its version to
the newest one, and never holds the trainer's ranks.

A worker that dies (any RayActorError), does not answer within its bound, or whose engine failed
to take an update (rollout/engine.py EngineUpdateError: it may hold a mix of two versions and
refuses to generate), is replaced by a fresh actor with the same id, brought to the newest
version by a full snapshot (`replace`); every call goes through one path that does this
(`_settle`: at most one replacement per call, then RolloutWorkerLost). `restarts` counts replacements (`engine_failures` the second kind) and more than
`rollout.max_restarts` of them stop the job with an error.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

from launch.rl_config import rollout_bundle
from models import ModelConfig
from rollout.config import RolloutConfig
from rollout.engine import EngineUpdateError
from rollout.results import EvalResult, RolloutBatch, WeightCheck
from rollout.tasks import TaskConfig
from rollout.worker import RolloutWorker
from sync.errors import CorruptTargetError, UpdateUnavailableError
from sync.payloads import SyncStats, WeightUpdate
from sync.relay import relay_parents, relay_update

log = logging.getLogger(__name__)


class UpdateSource(Protocol):
    """Where the group gets weight updates (sync/transport.py ShardedPublisher)."""

    def update_for(self, receiver_version: int | None) -> WeightUpdate: ...

    def updates_for(self, receiver_versions: list[int | None]) -> dict[int | None, WeightUpdate]: ...


class RolloutWorkerLost(RuntimeError):
    """More rollout workers died than rollout.max_restarts allows."""


class RolloutStartError(RuntimeError):
    """A rollout worker could not start (its engine could not load the model, say)."""


def _worker_lost_errors() -> tuple:
    import ray

    return (ray.exceptions.RayActorError, EngineUpdateError)


def _creation_error(e: BaseException) -> str:
    """The error an actor's constructor raised, from Ray's wrapped message (its last such line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if "Error: " in ln and "RayActorError" not in ln]
    return lines[-1] if lines else str(e).splitlines()[0]


ENGINE_FAILED = "engine update failed"  # the replace() reason that counts as an engine failure


def _reason(e: BaseException) -> str:
    return ENGINE_FAILED if isinstance(e, EngineUpdateError) else type(e).__name__


class RolloutGroup:
    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, task_cfg: TaskConfig,
                 updates: UpdateSource, apply_timeout_s: float, relay_fanout: int = 0):
        """`apply_timeout_s` (sync.apply_timeout_s) bounds every wait for a worker's update;
        `relay_fanout` (sync.relay_fanout) shapes the tree in which rollout nodes relay updates."""
        import ray

        self.model_cfg, self.cfg, self.task_cfg = model_cfg, rollout_cfg, task_cfg
        self.updates, self.apply_timeout_s = updates, float(apply_timeout_s)
        bundle = rollout_bundle(rollout_cfg)
        self._remote = ray.remote(RolloutWorker).options(
            num_cpus=bundle.pop("CPU"), num_gpus=bundle.pop("GPU", 0.0), resources=bundle,
            max_concurrency=2,  # an update can be offered while a batch is generating (async mode)
            max_restarts=0,  # replacement is the driver's job: it must also resend the weights
        )
        self.restarts = 0
        self.engine_failures = 0  # replacements because an engine failed to take an update
        self.corrupt_resyncs = 0  # workers resynced by snapshot because their weights were found altered
        self.refetches = 0  # updates a worker fetched again from the trainer nodes after a part did not arrive
        self.relay_fanout = relay_fanout
        self.relayed_nodes = 0  # nodes that got the last apply_all's update from another rollout node
        self.incarnations = [0] * rollout_cfg.workers
        self.workers = [self._start(i) for i in range(rollout_cfg.workers)]
        self._wait_started()
        self.versions: list[int | None] = [None] * rollout_cfg.workers
        self.pending: dict[int, Any] = {}  # async: worker id -> ObjectRef of its running generate
        self._nodes: dict[int, tuple[int, str]] = {}  # worker id -> (incarnation, Ray node id)

    def _start(self, i: int):
        return self._remote.remote(i, self.model_cfg, self.cfg, self.task_cfg, self.incarnations[i])

    def _wait_started(self) -> None:
        """Every worker built (its engine loaded and warmed up), or a named error before training."""
        import ray

        refs = [w.version.remote() for w in self.workers]
        try:
            ray.get(refs, timeout=self.cfg.start_timeout_s)
            return
        except ray.exceptions.GetTimeoutError:
            error = RolloutStartError(f"rollout workers did not start within rollout.start_timeout_s="
                                      f"{self.cfg.start_timeout_s} s (engine={self.cfg.engine})")
        except ray.exceptions.RayActorError as e:
            error = RolloutStartError(f"a rollout worker could not start (rollout.engine={self.cfg.engine}): "
                                      f"{_creation_error(e)}")
        self.shutdown()  # the group is never handed to the driver: its actors must not outlive this
        raise error

    def update_for(self, version: int | None) -> WeightUpdate:
        """The WeightUpdate from `version` to the newest one."""
        return self.updates.update_for(version)

    # -- failure handling: one path ---------------------------------------------------------------

    def replace(self, i: int, reason: str) -> SyncStats:
        """Start a new worker `i` and give it the newest weights by a full snapshot; a replacement
        that is lost too (it cannot start, its engine refuses the snapshot) is replaced in turn,
        every attempt counted against rollout.max_restarts."""
        import ray

        while True:
            self.restarts += 1
            if self.restarts > self.cfg.max_restarts:
                raise RolloutWorkerLost(f"rollout worker {i} lost ({reason}); {self.restarts} replacements exceed "
                                        f"rollout.max_restarts={self.cfg.max_restarts}")
            self.engine_failures += reason == ENGINE_FAILED
            self._check_placeable(i, reason)
            log.warning("rollout worker %d lost (%s); replacing it (restart %d)", i, reason, self.restarts)
            try:
                ray.kill(self.workers[i])
            except Exception:  # already gone
                pass
            self.pending.pop(i, None)
            self.incarnations[i] += 1
            self.workers[i] = self._start(i)
            self.versions[i] = None
            try:
                stats = ray.get(self.workers[i].apply_update.remote(self.update_for(None)),
                                timeout=self.cfg.start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                reason = f"no snapshot applied within rollout.start_timeout_s={self.cfg.start_timeout_s} s"
                continue
            except _worker_lost_errors() as e:
                reason = _reason(e)
                continue
            self.versions[i] = stats.version
            return stats

    def _check_placeable(self, i: int, reason: str) -> None:
        """RolloutWorkerLost at once when no live node offers what a worker needs (the custom
        resources of rollout.resources, GPUs): its node died and took them along, and a
        replacement would wait for them forever."""
        import ray

        needed = {k: v for k, v in rollout_bundle(self.cfg).items() if k != "CPU"}
        offered = ray.cluster_resources()
        missing = {k: v for k, v in needed.items() if offered.get(k, 0.0) < v}
        if missing:
            node = self._nodes.get(i, (None, "unknown"))[1]
            raise RolloutWorkerLost(f"rollout worker {i} lost ({reason}) and cannot be replaced: no live node offers "
                                    f"{missing} any more (its node {node} died or left the cluster)")

    def _settle(self, i: int, ref: Any, method: str, args: tuple = (), timeout_s: float | None = None,
                retry: bool = True) -> Any:
        """The result of worker i's call `method(*args)` (`ref`). A worker that is lost, or does
        not answer within `timeout_s`, is replaced (`replace`); with `retry` the call is then made
        once more on the fresh worker (lost again: RolloutWorkerLost), without it the fresh
        worker's snapshot stats are the result."""
        import ray

        for attempt in range(2):
            try:
                return ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                reason = f"{method} did not answer within {timeout_s} s"
            except _worker_lost_errors() as e:
                reason = _reason(e)
            if attempt:
                raise RolloutWorkerLost(f"rollout worker {i}: {method} failed twice ({reason}), the second time "
                                        "on a fresh worker")
            snapshot = self.replace(i, reason)
            if not retry:
                return snapshot
            ref = getattr(self.workers[i], method).remote(*args)

    def _call(self, i: int, method: str, *args, timeout_s: float | None = None) -> Any:
        """Worker i's `method(*args)`, through `_settle`."""
        return self._settle(i, getattr(self.workers[i], method).remote(*args), method, args, timeout_s)

    def _call_all(self, method: str, args: list[tuple], timeout_s: float) -> list:
        """`method(*args[i])` on every worker i in parallel, each through `_settle`."""
        refs = [getattr(w, method).remote(*args[i]) for i, w in enumerate(self.workers)]
        return [self._settle(i, ref, method, args[i], timeout_s) for i, ref in enumerate(refs)]

    def generate_one(self, i: int, prompts, samples_per_prompt: int) -> RolloutBatch:
        """Blocking generate on worker i."""
        result = self._call(i, "generate", prompts, samples_per_prompt, timeout_s=self.cfg.call_timeout_s)
        self.versions[i] = result.version
        return result

    # -- sync mode -------------------------------------------------------------------------------

    def apply_all(self) -> list[SyncStats]:
        """Bring every worker to the newest version (a delta, a chain of deltas, or a snapshot for
        a worker that is behind or new), all in parallel; their stats by worker.
        Workers on one node at one version share the work: the first fetches and verifies the
        update (a delta, a chain or a full snapshot), the others commit what it staged
        (sync/receiver.py SharedUpdate) after verifying it on their own weights, so a node
        decodes each update once however many workers it holds."""
        nodes_at: dict[int | None, dict[str, list[int]]] = {}  # version -> node -> its workers
        for i in range(len(self.workers)):
            nodes_at.setdefault(self.versions[i], {}).setdefault(self._node_of(i), []).append(i)
        refs: dict[int, Any] = {}
        self.relayed_nodes = 0
        for version, nodes in nodes_at.items():
            for members, update in zip(nodes.values(), self._relayed(self.update_for(version), list(nodes))):
                if len(members) == 1 or update.kind == "none":
                    refs.update({i: self.workers[i].apply_update.remote(update) for i in members})
                    continue
                lead, *rest = members
                shared = self.workers[lead].stage_shared.remote(update)
                refs[lead] = self.workers[lead].commit_shared.remote(shared)
                refs.update({i: self.workers[i].apply_shared.remote(shared, update) for i in rest})
        out = []
        for i in range(len(self.workers)):
            stats = self._settle_update(i, refs[i])
            self.versions[i] = stats.version
            out.append(stats)
        return out

    def _relayed(self, update: WeightUpdate, nodes: list[str]) -> list[WeightUpdate]:
        """The update each of `nodes` fetches: the first from the trainer nodes, every other one
        relayed by its parent in a tree of fan-out sync.relay_fanout (sync/relay.py), so the
        trainer nodes send it once."""
        updates: list[WeightUpdate] = []
        for parent in relay_parents(len(nodes), self.relay_fanout if update.kind != "none" else 0):
            updates.append(update if parent is None else relay_update(updates[parent], nodes[parent]))
            self.relayed_nodes += parent is not None
        return updates

    def _settle_update(self, i: int, ref: Any) -> SyncStats:
        """Worker i's update stats, waited for at most sync.apply_timeout_s. Besides `_settle`'s
        cases: committed weights found altered (CorruptTargetError) are resynced; a worker whose
        node-mate that staged for it died, or that has not answered in time (its fetch behind a
        link that stalled, or waiting for a staging that never reached it), fetches the update by
        itself, within the same bound, and is replaced when it cannot."""
        import ray

        try:
            return ray.get(ref, timeout=self.apply_timeout_s)
        except CorruptTargetError as e:
            return self._after_corrupt_target(i, e)
        except ray.exceptions.RayActorError as e:
            if e.actor_id in (None, self.workers[i]._actor_id.hex()):
                return self.replace(i, type(e).__name__)
        except ray.exceptions.GetTimeoutError:
            try:
                ray.cancel(ref)  # a call still waiting for its arguments (a shared staging) never starts
            except Exception:  # noqa: BLE001 - already finished or not cancellable: the fetch below decides
                pass
            log.warning("rollout worker %d: no update applied within sync.apply_timeout_s=%s s; it fetches the "
                        "update by itself", i, self.apply_timeout_s)
        except EngineUpdateError:
            return self.replace(i, ENGINE_FAILED)
        except UpdateUnavailableError as e:
            # a part that did not arrive: from a relay node that died or stalled, or behind a link
            # that stayed down past every fetch attempt; nothing was committed
            self.refetches += 1
            log.warning("rollout worker %d: update unavailable (%s); it fetches it from the trainer nodes by itself",
                        i, str(e).splitlines()[0])
        try:
            return self.resync(i)
        except CorruptTargetError as e:  # found while fetching by itself: its own weights were altered
            return self._after_corrupt_target(i, e)

    def _after_corrupt_target(self, i: int, e: CorruptTargetError) -> SyncStats:
        """Worker i's update failed on committed weights found altered, its own (it dropped its
        version: a snapshot restores it) or the worker's that staged it for the node (this one
        is intact: it fetches the update itself)."""
        version = self._call(i, "version", timeout_s=self.apply_timeout_s)
        if version is None:
            return self.resync_snapshot(i, str(e).splitlines()[0])
        return self.resync(i, version)

    def resync(self, i: int, version: int | None = None) -> SyncStats:
        """Blocking update of worker i from the version it holds (`version`, asked of the worker
        when not given) to the newest one (a sample was too stale, or a shared update did not
        reach it); a worker lost meanwhile is replaced."""
        if version is None:
            version = self._call(i, "version", timeout_s=self.apply_timeout_s)
        stats = self._settle(i, self.workers[i].apply_update.remote(self.update_for(version)), "apply_update",
                             timeout_s=self.apply_timeout_s, retry=False)
        self.versions[i] = stats.version
        return stats

    def resync_snapshot(self, i: int, reason: str) -> SyncStats:
        """Worker i's committed weights were found altered (a failed verification): it is brought
        back by a full snapshot, and the event is counted (`corrupt_resyncs`) and logged."""
        self.corrupt_resyncs += 1
        log.warning("rollout worker %d: committed weights found altered (%s); resyncing it by snapshot (%d so far)",
                    i, reason, self.corrupt_resyncs)
        stats = self._settle(i, self.workers[i].apply_update.remote(self.update_for(None)), "apply_update",
                             timeout_s=self.apply_timeout_s, retry=False)  # a replacement gets its snapshot anyway
        self.versions[i] = stats.version
        return stats

    def _node_of(self, i: int) -> str:
        if self._nodes.get(i, (None,))[0] != self.incarnations[i]:
            node = self._call(i, "node_id", timeout_s=self.apply_timeout_s)
            self._nodes[i] = (self.incarnations[i], node)
        return self._nodes[i][1]

    def generate_all(self, shares: list, samples_per_prompt: int) -> list[RolloutBatch]:
        """Every worker generates its share of prompts (`shares[i]` for worker i) in parallel; a
        worker that dies is replaced and its share generated again."""
        for i in range(len(self.workers)):
            self.launch(i, shares[i], samples_per_prompt)
        return [self.collect(i, shares[i], samples_per_prompt) for i in range(len(self.workers))]

    def evaluate(self, shares: list, samples: int, pass_threshold: float) -> list[EvalResult]:
        """Every worker evaluates its share of the eval prompts in parallel (a worker that dies is
        replaced and its share evaluated again). Async mode: running generates finish first
        (their results stay for `collect`); each worker evaluates the weights it holds."""
        import ray

        if self.pending:
            # bounded: a generate still running past the bound is left for `collect`, which replaces its worker
            ray.wait(list(self.pending.values()), num_returns=len(self.pending), timeout=self.cfg.call_timeout_s)
        return self._call_all("evaluate", [(shares[i], samples, pass_threshold) for i in range(len(self.workers))],
                              timeout_s=self.cfg.call_timeout_s)

    # -- async mode ------------------------------------------------------------------------------

    def launch(self, i: int, prompts, samples_per_prompt: int, min_version: int | None = None) -> None:
        self.pending[i] = self.workers[i].generate.remote(prompts, samples_per_prompt, min_version)

    def collect(self, i: int, prompts, samples_per_prompt: int) -> RolloutBatch:
        """The result of worker i's running generate (generated again if the worker was lost)."""
        ref = self.pending.pop(i, None)
        if ref is None:  # the worker was replaced since the launch (e.g. during an evaluation)
            ref = self.workers[i].generate.remote(prompts, samples_per_prompt)
        result = self._settle(i, ref, "generate", (prompts, samples_per_prompt), timeout_s=self.cfg.call_timeout_s)
        self.versions[i] = result.version
        return result

    def offer(self, base_versions: list[int]) -> None:
        """Async: every worker fetches the newest weights in the background. The candidate
        updates (one per base version a worker may be at) are small handles; nothing here waits
        (a dead worker shows up at its next collect)."""
        import ray

        candidates = ray.put(self.updates.updates_for(list(base_versions)))
        for w in self.workers:
            w.offer_update.remote(candidates)

    def drain(self, trainer_lost: bool = False) -> int:
        """Wait for (and drop) every running generate, e.g. at the end of an async run; the
        number of samples dropped. After a trainer death (`trainer_lost`) a generate that failed
        on an update offered by the dead trainer (its objects died with it) is dropped too."""
        import ray

        dropped = 0
        for i in list(self.pending):
            try:
                result = self._settle(i, self.pending.pop(i), "generate", timeout_s=self.cfg.call_timeout_s, retry=False)
            except ray.exceptions.RayTaskError as e:
                if not trainer_lost:
                    raise
                log.warning("rollout worker %d: batch dropped with the lost trainer (%s)", i, type(e).__name__)
                continue
            if isinstance(result, RolloutBatch):  # not a replacement's snapshot stats
                self.versions[i] = result.version
                dropped += result.size
        return dropped

    # -- end ---------------------------------------------------------------------------------------

    def verify_all(self) -> list[WeightCheck]:
        """Every worker's weights checked now (RolloutWorker.verify_weights), all in parallel."""
        return self._call_all("verify_weights", [()] * len(self.workers), timeout_s=self.apply_timeout_s)

    def export_final(self, run_dir: str) -> list[str]:
        """Every worker writes the weights it handed its engine to <run_dir>/rollout_final/worker_<i>/."""
        return self._call_all("export_final", [(f"{run_dir}/rollout_final/worker_{i}",) for i in range(len(self.workers))],
                              timeout_s=self.cfg.call_timeout_s)

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
        self.workers = []

