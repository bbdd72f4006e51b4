"""A rollout worker: a policy copy at a known weight version that completes the prompts the driver
sends (data/prompts.py Samples), scores them with the task's reward functions (rollout/rewards.py,
once per batch) and returns a RolloutBatch (rollout/results.py); `evaluate` gives greedy rewards
and pass@k on eval prompts.

A plain class; launch/rl.py applies `ray.remote(...)` where it builds the group (with
`max_concurrency=2` so an update can be offered while a batch is generating), and tests use it
directly.

It generates with the engine `rollout.engine` names (rollout/engine.py: our KV-cache loop, or
vLLM). Weights arrive through a sync WeightReceiver whose target is the engine's committed weights
in checkpoint coordinates (`engine.weights()`); after every commit the engine is handed the
tensors that changed (`engine.load_weights`). An engine that fails there leaves the worker
refusing every call (EngineUpdateError) until the driver rebuilds it from a snapshot.
- sync mode: `apply_update(update)` downloads, decodes and swaps in one call;
- async mode: `offer_update(update)` returns at once and a background thread downloads and
  decodes into a staging copy; the next `generate` starts by swapping it in. Only that swap pauses
  generation; its duration is reported as `pause_s`, apart from the transfer/decode time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time

import torch

from models import ModelConfig
from rollout.batch import encode_prompts
from rollout.config import RolloutConfig
from rollout.engine import EngineUpdateError, RolloutEngine, build_engine
from rollout.generation import SamplingConfig
from data.prompts import Sample
from rollout.results import EvalResult, RolloutBatch, WeightCheck
from rollout.rewards import ScoredBatch, build_reward_fns, score_batch
from rollout.tasks import BUILTIN_TASKS, TaskConfig, build_task
from sync.errors import CorruptBucketError, SyncError, TensorMismatchError, VersionMismatchError
from sync.receiver import StagedUpdate

log = logging.getLogger(__name__)


def _quiet_progress_bars() -> None:
    """No transformers progress bars (loading, export) from each of K workers: the driver's
    console shows one job, not K copies of the same bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class RolloutWorker:
    def __init__(self, worker_id: int, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, task_cfg: TaskConfig,
                 incarnation: int = 0, engine: RolloutEngine | None = None):
        from sync.receiver import WeightReceiver

        torch.set_num_threads(rollout_cfg.num_threads)
        _quiet_progress_bars()
        if rollout_cfg.nice:
            os.nice(rollout_cfg.nice)
        self.worker_id = worker_id
        self.cfg = rollout_cfg
        self.sampling = SamplingConfig(rollout_cfg.temperature, rollout_cfg.top_p, rollout_cfg.max_new_tokens)
        # Prompts come from the driver; a built-in task is kept for `generate(<count>, ...)`.
        self.task = build_task(task_cfg) if task_cfg.name in BUILTIN_TASKS else None
        self.reward_fns = build_reward_fns(task_cfg.reward_fns, task_cfg.reward_weights)
        self.task_cfg = task_cfg
        # Distinct, reproducible streams per worker and per replacement of a dead one.
        seed = rollout_cfg.seed * 1_000_000 + incarnation * 1000 + worker_id
        self.engine = engine if engine is not None else build_engine(model_cfg, rollout_cfg, seed)
        self.model_cfg = model_cfg
        self.tokenizer = self.engine.tokenizer
        self.receiver = WeightReceiver(target=self.engine.weights(), version=None)
        self._engine_failure: str | None = None  # set when the engine failed to take a commit
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self._lock = threading.Lock()  # guards the staged slot
        self._fetched = threading.Condition(self._lock)  # notified when a fetch ends (any outcome)
        self._no_update = False  # the last offer had nothing for this worker's version
        # fetch (shadow decode) and commit (shadow -> target) must not interleave; they rarely
        # meet, since updates are offered after a batch has started and swapped at the next one.
        self._receiver_lock = threading.Lock()
        self._update_lock = threading.Lock()  # one offer/apply at a time (they join the fetch thread)
        self._staged = None  # a fetched, verified update waiting to be swapped in
        self._fetch_stats: dict = {}
        self._fetch_error: BaseException | None = None
        self._fetch_thread: threading.Thread | None = None
        self._shared_staged = None  # sync mode: staged by stage_shared for this node's workers
        self._shared_fetch_s = 0.0

    # -- weights -------------------------------------------------------------------------------

    def version(self) -> int | None:
        return self.receiver.version

    def state_checksum(self) -> str:
        return self.receiver.state_checksum()

    def verify_weights(self) -> WeightCheck:
        """The committed weights (the tensors handed to the engine) digested from their bits now,
        not from digests cached at commit, and what the engine computes with them (its own copy,
        when it keeps one) against a reference computed from them."""
        self._check_engine()
        with self._receiver_lock:
            version, checksum = self.receiver.version, self.receiver.reread_checksum()
            diff = self.engine.logprob_diff_vs_committed() if version is not None else None
        return WeightCheck(version, checksum, diff)

    def export_final(self, out_dir: str) -> str:
        """Write the committed weights (what the engine was handed), read back from the receiver's
        target, as the trainer's export lays them out (models/export.py)."""
        from models import build_model
        from models.export import export_gpt_directory, export_hf_directory

        with self._receiver_lock:
            state = {k: v.detach().cpu().clone() for k, v in self.engine.weights().items()}
        with torch.device("meta"):
            skeleton, _ = build_model(self.model_cfg)
        if self.model_cfg.kind == "hf":
            return str(export_hf_directory(skeleton, self.model_cfg.path, out_dir, state))
        return str(export_gpt_directory(skeleton, out_dir, state))

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the policy's weights (tests, export)."""
        return {k: v.detach().cpu().clone() for k, v in self.engine.weights().items()}

    @contextlib.contextmanager
    def _sync_update(self):
        """A sync-mode update: one at a time, after any background fetch, and superseding
        whatever an offer staged (failed ones included)."""
        with self._update_lock:
            self._wait_fetch()
            with self._lock:
                self._staged, self._fetch_error = None, None
            yield

    def apply_update(self, update) -> dict:
        """Sync mode: download + decode + swap now. Returns the receiver's stats + checksum."""
        with self._sync_update():
            started = time.perf_counter()
            with self._receiver_lock:
                stats = self._commit(self.receiver.fetch(update))
                stats["checksum"] = self.receiver.state_checksum()
            stats["sync_s"] = time.perf_counter() - started
            return stats

    def _commit(self, staged: StagedUpdate) -> dict:
        """Commit a verified update into the receiver's target, then hand the engine the tensors
        it changed. An engine that fails to take them may hold a mix of two versions: the worker
        then refuses every call until it is rebuilt from a snapshot (EngineUpdateError)."""
        self._check_engine()
        names = staged.changed_tensors()
        stats = dict(self.receiver.commit(staged))
        started = time.perf_counter()
        try:
            self.engine.load_weights(names)
        except Exception as e:  # noqa: BLE001 - whatever the engine raised, the worker is now unusable
            self._engine_failure = (f"version {stats['version']}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}")
            log.error("rollout worker %d: engine failed to load %s", self.worker_id, self._engine_failure)
            self._check_engine()
        stats["engine_load_s"] = time.perf_counter() - started
        return stats

    def _check_engine(self) -> None:
        if self._engine_failure is not None:
            raise EngineUpdateError(f"rollout worker {self.worker_id}: its engine failed to load the weights of "
                                    f"{self._engine_failure}; it must be rebuilt from a snapshot")

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stage_shared(self, update):
        """Sync mode, one worker per node: fetch and verify `update` and keep it staged (commit
        with commit_shared); returns it for the node's other workers (apply_shared), which then
        neither download nor decode it."""
        with self._sync_update():
            started = time.perf_counter()
            with self._receiver_lock:
                self._shared_staged = self.receiver.fetch(update)
                self._shared_fetch_s = time.perf_counter() - started
                return self.receiver.share(self._shared_staged)

    def commit_shared(self, _shared=None) -> dict:
        """Swap in what stage_shared staged (the argument only orders the call after it)."""
        with self._update_lock, self._receiver_lock:
            started = time.perf_counter()
            staged, self._shared_staged = self._shared_staged, None
            if staged is None:
                raise SyncError("commit_shared without a staged update (stage_shared failed or ran elsewhere)")
            stats = self._commit(staged)
            stats["checksum"] = self.receiver.state_checksum()
            stats["sync_s"] = self._shared_fetch_s + time.perf_counter() - started
            return stats

    def apply_shared(self, shared, update) -> dict:
        """Sync mode: commit an update another worker on this node staged (stage_shared); when
        this worker's weights are not the ones it was staged against, fetch `update` itself."""
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
                    stats = self._commit(staged)
                    stats["shared"] = True
                stats["checksum"] = self.receiver.state_checksum()
            stats["sync_s"] = time.perf_counter() - started
            return stats

    def offer_update(self, candidates: dict) -> None:
        """Async mode: fetch the newest weights in the background; `generate` swaps them in.

        `candidates` maps a base version to the WeightUpdate that brings a receiver at that
        version to the newest one (the driver cannot know whether an earlier offer was swapped
        in yet). Nothing matching this worker's version: nothing is staged, the worker keeps
        generating with its weights, and the driver resyncs it when its samples get too stale.
        """
        with self._update_lock:
            self._wait_fetch()
            with self._lock:  # an older staged update must not be swapped in under a newer fetch
                self._staged = None
                self._no_update = False

            def fetch():
                try:
                    started = time.perf_counter()
                    with self._receiver_lock:
                        update = candidates.get(self.receiver.version)
                        staged = None if update is None else self.receiver.fetch(update)
                    with self._lock:
                        self._staged = staged
                        self._no_update = staged is None
                        self._fetch_stats = {"fetch_s": time.perf_counter() - started}
                        self._fetched.notify_all()
                except BaseException as e:  # surfaced by the next generate, never swallowed
                    with self._lock:
                        self._fetch_error = e
                        self._fetched.notify_all()

            self._fetch_thread = threading.Thread(target=fetch, name=f"weight-fetch-{self.worker_id}", daemon=True)
            self._fetch_thread.start()

    def _wait_fetch(self) -> None:
        if self._fetch_thread is not None:
            self._fetch_thread.join()
            self._fetch_thread = None

    def _commit_staged(self) -> dict:
        """Swap in a fetched update if one is ready (the only pause generation sees)."""
        with self._lock:
            error, self._fetch_error = self._fetch_error, None
            staged, self._staged = self._staged, None
            fetch_stats = self._fetch_stats
        if error is not None:
            raise error
        if staged is None:
            return {}
        started = time.perf_counter()
        with self._receiver_lock:
            try:
                stats = self._commit(staged)
            except SyncError:  # superseded: a newer fetch already rolled this one back
                return {}
            stats["pause_s"] = time.perf_counter() - started
            stats["checksum"] = self.receiver.state_checksum()  # after the pause, not part of it
        stats.update(fetch_stats)
        return stats

    # -- sampling ------------------------------------------------------------------------------

    def _await_version(self, min_version: int, timeout_s: float) -> tuple[dict, float]:
        """Async mode: swap in offered weights until the version is at least `min_version`
        (the staleness bound of the batch about to start), waiting for an in-flight fetch at most
        `timeout_s`. Returns the last swap's stats and the seconds spent waiting."""
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
        return stats, time.perf_counter() - started

    def generate(self, prompts: list[Sample] | int, samples_per_prompt: int, min_version: int | None = None,
                 wait_timeout_s: float = 10.0) -> RolloutBatch:
        """`samples_per_prompt` completions of every prompt (groups are consecutive rows), scored,
        and which weight version produced them. `prompts` are the driver's Samples, or a count to
        draw from a built-in task here (tests, benchmarks). Async mode passes `min_version`: an
        offered update still downloading is waited for when the weights in place would be too
        stale (`weights_wait_s`, apart from the swap's pause_s)."""
        if min_version is None:
            sync_stats, wait_s = self._commit_staged(), 0.0
        else:
            sync_stats, wait_s = self._await_version(min_version, wait_timeout_s)
            if sync_stats:
                sync_stats["weights_wait_s"] = wait_s
        self._check_engine()
        if self.receiver.version is None:
            raise RuntimeError(f"rollout worker {self.worker_id} has no weights yet; apply a snapshot first")
        if isinstance(prompts, int):
            if self.task is None:
                raise ValueError(f"task.name={self.task_cfg.name!r}: pass the prompts (Samples), not a count")
            prompts = self.task.sample(prompts, self.rng)
        started = time.perf_counter()
        rows = [p for p in prompts for _ in range(samples_per_prompt)]
        prompt_ids, gen, completions = self._complete(rows, self.sampling)
        gen_s = time.perf_counter() - started
        scored = self._score(rows, completions)
        return RolloutBatch(
            worker_id=self.worker_id, version=self.receiver.version, prompt_ids=prompt_ids, tokens=gen.tokens,
            logprobs=gen.logprobs, lengths=gen.lengths, finished=gen.finished,
            rewards=torch.tensor(scored.rewards, dtype=torch.float32),
            reward_failures=[reason for _, reason in scored.failures], reward_components=scored.components,
            prompts=[p.prompt for p in prompts], completions=completions, gen_s=gen_s, sync=sync_stats,
        )

    def evaluate(self, prompts: list[Sample], samples: int, pass_threshold: float = 1.0) -> EvalResult:
        """Per prompt: the reward of the greedy completion, and whether any of `samples` sampled
        completions (rollout temperature and top_p) reaches `pass_threshold` (pass@k, k = samples)."""
        self._check_engine()
        if self.receiver.version is None:
            raise RuntimeError(f"rollout worker {self.worker_id} has no weights yet; apply a snapshot first")
        from dataclasses import replace

        if not prompts:
            return EvalResult(self.receiver.version, [], [])
        _, _, greedy = self._complete(prompts, replace(self.sampling, greedy=True))
        greedy_scored = self._score(prompts, greedy)
        rows = [p for p in prompts for _ in range(samples)]
        _, _, sampled = self._complete(rows, self.sampling)
        sampled_scored = self._score(rows, sampled)
        passed = [any(r >= pass_threshold for r in sampled_scored.rewards[i * samples:(i + 1) * samples])
                  for i in range(len(prompts))]
        return EvalResult(self.receiver.version, greedy_scored.rewards, passed,
                          len(greedy_scored.failures) + len(sampled_scored.failures))

    def _complete(self, rows: list[Sample], sampling: SamplingConfig):
        """Prompt ids, the Generation, and the decoded completions of `rows`."""
        prompt_ids = encode_prompts([r.prompt for r in rows], self.tokenizer)
        gen = self.engine.generate(prompt_ids, sampling, self.generator)
        completions = [self.tokenizer.decode(gen.tokens[i, : int(gen.lengths[i])].tolist()) for i in range(len(rows))]
        return prompt_ids, gen, completions

    def _score(self, rows: list[Sample], completions: list[str]) -> ScoredBatch:
        """Every reward function once on the batch, with the rows' other columns by name."""
        names = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in rows] for k in names}
        return score_batch(self.reward_fns, [r.prompt for r in rows], completions, columns,
                           self.task_cfg.on_reward_error, self.task_cfg.reward_timeout_s or None)
