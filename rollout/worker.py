"""A rollout worker: a policy copy at a known weight version that completes the driver's prompts
(data/prompts.py Samples) with the engine `rollout.engine` names (rollout/engine.py), scores them
once per batch (rollout/rewards.py) and returns a RolloutBatch (rollout/results.py); `evaluate`
gives greedy rewards and pass@k. Its weights and their updates live in a WeightSlot
(rollout/weight_slot.py). A plain class: launch/rl_rollouts.py makes it an actor (max_concurrency=2,
so an update can be offered while a batch generates); tests use it directly.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import replace

import torch

from data.prompts import Sample
from models import ModelConfig
from rollout.batch import encode_prompts
from rollout.config import RolloutConfig
from rollout.engine import RolloutEngine, build_engine
from rollout.generation import Generation, SamplingConfig
from rollout.results import EvalResult, RolloutBatch, WeightCheck
from rollout.rewards import ScoredBatch, build_reward_fns, score_batch
from rollout.tasks import BUILTIN_TASKS, TaskConfig, build_task
from rollout.weight_slot import WeightSlot
from sync.payloads import SyncStats, WeightUpdate
from sync.receiver import SharedUpdate


class RolloutWorker:
    def __init__(self, worker_id: int, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, task_cfg: TaskConfig,
                 incarnation: int = 0, engine: RolloutEngine | None = None):
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(rollout_cfg.num_threads)
        hf_logging.disable_progress_bar()  # the driver's console shows one job, not K copies of its bars
        if rollout_cfg.nice:
            os.nice(rollout_cfg.nice)
        self.worker_id, self.cfg, self.model_cfg, self.task_cfg = worker_id, rollout_cfg, model_cfg, task_cfg
        self.sampling = SamplingConfig(rollout_cfg.temperature, rollout_cfg.top_p, rollout_cfg.max_new_tokens)
        # Prompts come from the driver; a built-in task is kept for `generate(<count>, ...)`.
        self.task = build_task(task_cfg) if task_cfg.name in BUILTIN_TASKS else None
        self.reward_fns = build_reward_fns(task_cfg.reward_fns, task_cfg.reward_weights)
        # Distinct, reproducible streams per worker and per replacement of a dead one.
        seed = rollout_cfg.seed * 1_000_000 + incarnation * 1000 + worker_id
        self.engine = engine if engine is not None else build_engine(model_cfg, rollout_cfg, seed)
        self.tokenizer = self.engine.tokenizer
        self.slot = WeightSlot(self.engine, worker_id)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    # -- weights (rollout/weight_slot.py) ------------------------------------------------------------

    def version(self) -> int | None:
        return self.slot.version

    def state_checksum(self) -> str:
        return self.slot.state_checksum()

    def verify_weights(self) -> WeightCheck:
        return self.slot.verify()

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the policy's committed weights (tests, export)."""
        return self.slot.committed_copy()

    def apply_update(self, update: WeightUpdate) -> SyncStats:
        return self.slot.apply(update)

    def stage_shared(self, update: WeightUpdate) -> SharedUpdate:
        return self.slot.stage_shared(update)

    def commit_shared(self, _shared: SharedUpdate | None = None) -> SyncStats:
        """Swap in what stage_shared staged (the argument only orders the call after it)."""
        return self.slot.commit_shared()

    def apply_shared(self, shared: SharedUpdate, update: WeightUpdate) -> SyncStats:
        return self.slot.apply_shared(shared, update)

    def offer_update(self, candidates: dict[int | None, WeightUpdate]) -> None:
        self.slot.offer(candidates)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()  # the group decodes an update once per node

    def export_final(self, out_dir: str) -> str:
        """Write the committed weights (what the engine was handed) as the trainer exports them."""
        from models.export import export_state

        return str(export_state(self.model_cfg, out_dir, self.slot.committed_copy()))

    # -- sampling ------------------------------------------------------------------------------

    def generate(self, prompts: list[Sample] | int, samples_per_prompt: int, min_version: int | None = None,
                 wait_timeout_s: float = 10.0) -> RolloutBatch:
        """`samples_per_prompt` completions of every prompt (groups are consecutive rows), scored,
        and which weight version produced them. `prompts` are the driver's Samples, or a count to
        draw from a built-in task here (tests, benchmarks). Async mode passes `min_version`: an
        offered update still downloading is waited for when the weights in place would be too
        stale (`weights_wait_s`, apart from the swap's pause_s)."""
        sync_stats = self.slot.swap_in(min_version, wait_timeout_s)
        version = self._policy_version()
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
            worker_id=self.worker_id, version=version, prompt_ids=prompt_ids, tokens=gen.tokens,
            logprobs=gen.logprobs, lengths=gen.lengths, finished=gen.finished,
            rewards=torch.tensor(scored.rewards, dtype=torch.float32),
            reward_failures=[reason for _, reason in scored.failures], reward_components=scored.components,
            prompts=[p.prompt for p in prompts], completions=completions, gen_s=gen_s, sync=sync_stats,
        )

    def evaluate(self, prompts: list[Sample], samples: int, pass_threshold: float = 1.0) -> EvalResult:
        """Per prompt: the reward of the greedy completion, and whether any of `samples` sampled
        completions (rollout temperature and top_p) reaches `pass_threshold` (pass@k, k = samples)."""
        version = self._policy_version()
        if not prompts:
            return EvalResult(version, [], [])
        _, _, greedy = self._complete(prompts, replace(self.sampling, greedy=True))
        greedy_scored = self._score(prompts, greedy)
        rows = [p for p in prompts for _ in range(samples)]
        _, _, sampled = self._complete(rows, self.sampling)
        sampled_scored = self._score(rows, sampled)
        passed = [any(r >= pass_threshold for r in sampled_scored.rewards[i * samples:(i + 1) * samples])
                  for i in range(len(prompts))]
        return EvalResult(version, greedy_scored.rewards, passed,
                          len(greedy_scored.failures) + len(sampled_scored.failures))

    def _policy_version(self) -> int:
        self.slot.check_engine()
        if self.slot.version is None:
            raise RuntimeError(f"rollout worker {self.worker_id} has no weights yet; apply a snapshot first")
        return self.slot.version

    def _complete(self, rows: list[Sample], sampling: SamplingConfig) -> tuple[list[list[int]], Generation, list[str]]:
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
