"""The rollout actor group: K RolloutWorker actors, their weight versions, and their replacement.

The driver sees coarse calls (`generate_all`, `apply_all`, `launch`/`collect`/`offer` for async
mode). A worker that dies (any RayActorError), or whose engine failed to take an update
(rollout/engine.py EngineUpdateError: it may hold a mix of two versions and refuses to
generate), is replaced by a fresh actor with the same id, brought to the trainer's newest version
by a full snapshot; `restarts` counts replacements (`engine_failures` the second kind) and more
than `rollout.max_restarts` of them stop the job with an error.
"""
from __future__ import annotations

import logging

from launch.rl_config import rollout_bundle
from models import ModelConfig
from rollout.config import RolloutConfig
from rollout.engine import EngineUpdateError
from rollout.results import EvalResult, RolloutBatch, WeightCheck
from rollout.tasks import TaskConfig
from rollout.worker import RolloutWorker
from sync.errors import CorruptTargetError

log = logging.getLogger(__name__)


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
    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, task_cfg: TaskConfig, publisher):
        """`publisher` answers `update_for(version) -> WeightUpdate` in the driver (the trainer
        group's ShardedPublisher, sync/transport.py)."""
        import ray

        self.model_cfg, self.cfg, self.task_cfg = model_cfg, rollout_cfg, task_cfg
        self.publisher = publisher
        bundle = rollout_bundle(rollout_cfg)
        self._remote = ray.remote(RolloutWorker).options(
            num_cpus=bundle.pop("CPU"), num_gpus=bundle.pop("GPU", 0.0), resources=bundle,
            max_concurrency=2,  # an update can be offered while a batch is generating (async mode)
            max_restarts=0,  # replacement is the driver's job: it must also resend the weights
        )
        self.restarts = 0
        self.engine_failures = 0  # replacements because an engine failed to take an update
        self.corrupt_resyncs = 0  # workers resynced by snapshot because their weights were found altered
        self.incarnations = [0] * rollout_cfg.workers
        self.workers = [self._start(i) for i in range(rollout_cfg.workers)]
        self._wait_started()
        self.versions: list[int | None] = [None] * rollout_cfg.workers
        self.pending: dict[int, object] = {}  # async: worker id -> ObjectRef of its running generate
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

    def update_for(self, version: int | None):
        """The trainer's WeightUpdate from `version` to its newest one."""
        return self.publisher.update_for(version)

    # -- failure handling ----------------------------------------------------------------------

    def replace(self, i: int, reason: str) -> dict:
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
            self.versions[i] = stats["version"]
            return stats

    def generate_one(self, i: int, prompts, samples_per_prompt: int) -> RolloutBatch:
        """Blocking generate on worker i (replaced and retried once if it died)."""
        result = self._call(i, "generate", prompts, samples_per_prompt)
        self.versions[i] = result.version
        return result

    def _call(self, i: int, method: str, *args, timeout_s: float | None = None):
        """ray.get one call on worker i, replacing the worker and retrying once if it died (or,
        with `timeout_s`, did not answer within it)."""
        import ray

        for attempt in range(2):
            try:
                return ray.get(getattr(self.workers[i], method).remote(*args), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                if attempt:
                    raise RolloutWorkerLost(f"rollout worker {i}: {method} did not answer within {timeout_s} s, "
                                            "twice (the second time a fresh worker)") from None
                self.replace(i, f"{method} did not answer within {timeout_s} s")
            except _worker_lost_errors() as e:
                if attempt:
                    raise
                self.replace(i, _reason(e))

    # -- sync mode -------------------------------------------------------------------------------

    def apply_all(self) -> list[dict]:
        """Bring every worker to the trainer's newest version (a delta, a chain of deltas, or a
        snapshot for a worker that is behind or new), all in parallel; their stats by worker.
        Workers on one node at one version share the work: the first fetches and verifies the
        update (a delta, a chain or a full snapshot), the others commit what it staged
        (sync/receiver.py SharedUpdate) after verifying it on their own weights, so a node
        decodes each update once however many workers it holds."""
        import ray

        groups: dict = {}
        for i in range(len(self.workers)):
            groups.setdefault((self._node_of(i), self.versions[i]), []).append(i)
        refs: dict[int, object] = {}
        for (_, version), members in groups.items():
            update = self.update_for(version)
            if len(members) == 1 or update.kind == "none":
                refs.update({i: self.workers[i].apply_update.remote(update) for i in members})
                continue
            # a full send (snapshot) too: fetched, checked and decoded once per node, and each
            # other worker copies the staged tensors from the node's object store into its target
            lead, *rest = members
            shared = self.workers[lead].stage_shared.remote(update)
            refs[lead] = self.workers[lead].commit_shared.remote(shared)
            refs.update({i: self.workers[i].apply_shared.remote(shared, update) for i in rest})
        out = []
        for i in range(len(self.workers)):
            try:
                stats = self._get_applied(i, refs[i])
            except EngineUpdateError:
                stats = self.replace(i, ENGINE_FAILED)
            except CorruptTargetError as e:
                stats = self._after_corrupt_target(i, e)
            except ray.exceptions.RayActorError as e:
                if e.actor_id not in (None, self.workers[i]._actor_id.hex()):
                    # the worker that staged for this one died, this one did not: fetch itself
                    stats = self._call(i, "apply_update", self.update_for(self.versions[i]),
                                       timeout_s=self._apply_timeout_s())
                else:
                    stats = self.replace(i, type(e).__name__)
            self.versions[i] = stats["version"]
            out.append(stats)
        return out

    def _apply_timeout_s(self) -> float:
        return float(self.publisher.cfg.apply_timeout_s)

    def _get_applied(self, i: int, ref) -> dict:
        """Worker i's update stats, waited for at most sync.apply_timeout_s. A worker that has not
        answered by then (its fetch behind a link that stalled, or waiting for a shared staging
        that never reached it) is asked once to fetch the update by itself, within the same
        bound, and is replaced when it cannot: the driver never waits without a bound."""
        import ray

        timeout_s = self._apply_timeout_s()
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            pass
        try:
            ray.cancel(ref)  # a call still waiting for its arguments (a shared staging) never starts
        except Exception:  # noqa: BLE001 - already finished or not cancellable: the retry below decides
            pass
        log.warning("rollout worker %d: no update applied within sync.apply_timeout_s=%s s; it fetches the update "
                    "by itself", i, timeout_s)
        try:
            version = ray.get(self.workers[i].version.remote(), timeout=timeout_s)
            return ray.get(self.workers[i].apply_update.remote(self.update_for(version)), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return self.replace(i, f"no update applied within 2 x sync.apply_timeout_s={timeout_s} s")

    def _after_corrupt_target(self, i: int, e: CorruptTargetError) -> dict:
        """Worker i's update failed on committed weights found altered, its own (it dropped its
        version: a snapshot restores it) or the worker's that staged it for the node (this one
        is intact: it fetches the update itself)."""
        import ray

        version = ray.get(self.workers[i].version.remote(), timeout=self._apply_timeout_s())
        if version is None:
            return self.resync_snapshot(i, str(e).splitlines()[0])
        return self._call(i, "apply_update", self.update_for(version), timeout_s=self._apply_timeout_s())

    def resync_snapshot(self, i: int, reason: str) -> dict:
        """Worker i's committed weights were found altered (a failed verification): it is brought
        back by a full snapshot, and the event is counted (`corrupt_resyncs`) and logged."""
        self.corrupt_resyncs += 1
        log.warning("rollout worker %d: committed weights found altered (%s); resyncing it by snapshot (%d so far)",
                    i, reason, self.corrupt_resyncs)
        stats = self._call(i, "apply_update", self.update_for(None), timeout_s=self._apply_timeout_s())
        self.versions[i] = stats["version"]
        return stats

    def _node_of(self, i: int) -> str:
        if self._nodes.get(i, (None,))[0] != self.incarnations[i]:
            node = self._call(i, "node_id", timeout_s=self._apply_timeout_s())
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
            ray.wait(list(self.pending.values()), num_returns=len(self.pending))
        return self._call_all("evaluate", [(shares[i], samples, pass_threshold) for i in range(len(self.workers))])

    def _call_all(self, method: str, args: list[tuple], timeout_s: float | None = None) -> list:
        """`method(*args[i])` on every worker i in parallel; a worker that is lost (or, with
        `timeout_s`, does not answer within it) is replaced and its call made again."""
        import ray

        refs = [getattr(w, method).remote(*args[i]) for i, w in enumerate(self.workers)]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except ray.exceptions.GetTimeoutError:
                self.replace(i, f"{method} did not answer within {timeout_s} s")
                out.append(self._call(i, method, *args[i], timeout_s=timeout_s))
            except _worker_lost_errors() as e:
                self.replace(i, _reason(e))
                out.append(self._call(i, method, *args[i], timeout_s=timeout_s))
        return out

    # -- async mode ------------------------------------------------------------------------------

    def launch(self, i: int, prompts, samples_per_prompt: int, min_version: int | None = None) -> None:
        self.pending[i] = self.workers[i].generate.remote(prompts, samples_per_prompt, min_version)

    def collect(self, i: int, prompts, samples_per_prompt: int) -> RolloutBatch:
        """The result of worker i's running generate (replacing the worker if it died)."""
        import ray

        ref = self.pending.pop(i, None)
        if ref is None:  # the worker was replaced since the launch (e.g. during an evaluation)
            result = self._call(i, "generate", prompts, samples_per_prompt)
        else:
            try:
                result = ray.get(ref)
            except _worker_lost_errors() as e:
                self.replace(i, _reason(e))
                result = self._call(i, "generate", prompts, samples_per_prompt)
        self.versions[i] = result.version
        return result

    def resync(self, i: int) -> dict:
        """Blocking update of worker i to the newest version (a sample was too stale)."""
        import ray

        try:
            stats = ray.get(self.workers[i].apply_update.remote(self.update_for(self.versions[i])),
                            timeout=self._apply_timeout_s())
        except ray.exceptions.GetTimeoutError:
            stats = self.replace(i, f"no update applied within sync.apply_timeout_s={self._apply_timeout_s()} s")
        except _worker_lost_errors() as e:
            stats = self.replace(i, _reason(e))
        self.versions[i] = stats["version"]
        return stats

    def offer(self, base_versions: list[int]) -> None:
        """Async: every worker fetches the newest weights in the background. The candidate
        updates (one per base version a worker may be at) are small handles; nothing here waits
        (a dead worker shows up at its next collect)."""
        import ray

        candidates = ray.put(self.publisher.updates_for(base_versions))
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
                result = ray.get(self.pending.pop(i))
                self.versions[i] = result.version
                dropped += result.size
            except _worker_lost_errors() as e:
                self.replace(i, _reason(e))
            except ray.exceptions.RayTaskError as e:
                if not trainer_lost:
                    raise
                log.warning("rollout worker %d: batch dropped with the lost trainer (%s)", i, type(e).__name__)
        return dropped

    # -- end ---------------------------------------------------------------------------------------

    def verify_all(self) -> list[WeightCheck]:
        """Every worker's weights checked now (RolloutWorker.verify_weights), all in parallel."""
        return self._call_all("verify_weights", [()] * len(self.workers), timeout_s=self._apply_timeout_s())

    def export_final(self, run_dir: str) -> list[str]:
        """Every worker writes the weights it handed its engine to <run_dir>/rollout_final/worker_<i>/."""
        return self._call_all("export_final", [(f"{run_dir}/rollout_final/worker_{i}",) for i in range(len(self.workers))])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
        self.workers = []

