"""The RL driver's numbers: one step's metrics by their logged names (steps.jsonl, wandb), the
history they accumulate in, the traffic and sample totals, and summary.json made from them.
Pure functions over the typed stats the actors return (sync/payloads.py PublishStats and
SyncStats); launch/rl.py calls them."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rollout.results import EvalResult, RolloutBatch
from sync.payloads import PublishStats, SyncStats

if TYPE_CHECKING:
    from launch.rl_config import RLJobConfig


def new_totals() -> dict[str, float]:
    return {"payload": 0, "dense": 0, "snapshot_payload": 0, "mismatches": 0, "discarded": 0, "dropped_lost": 0,
            "verify_checks": 0, "verify_mismatches": 0}


@contextmanager
def stopwatch(times: dict[str, float], key: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        times[key] = time.perf_counter() - started


def rollout_metrics(shares: Sequence[RolloutBatch], trainer_version: int, group_size: int) -> dict[str, float]:
    """The rollouts' numbers of one step: rewards (each reward function's too), response
    lengths, generation throughput, and how many versions behind the trained weights they are."""
    import torch

    rewards = torch.cat([s.rewards for s in shares])
    lengths = torch.cat([s.lengths for s in shares])
    staleness = (trainer_version - torch.cat([torch.full((s.size,), s.version) for s in shares])).float()
    gen_s = max(s.gen_s for s in shares)
    groups = rewards.view(-1, group_size)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/zero_std_frac": float((groups.max(1).values == groups.min(1).values).float().mean()),
        "reward/failures": sum(len(s.reward_failures) for s in shares),
        "response/length_mean": float(lengths.float().mean()),
        "response/length_max": float(lengths.max()),
        "response/finished_frac": float(torch.cat([s.finished for s in shares]).float().mean()),
        **{f"reward/{name}": sum(sum(s.reward_components[name]) for s in shares) / len(rewards)
           for name in shares[0].reward_components},
        "rollout/tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9),
        "rollout/gen_s": gen_s,
        "staleness/mean": float(staleness.mean()),
        "staleness/max": float(staleness.max()),
    }


def eval_metrics(results: Sequence[EvalResult], samples: int) -> dict[str, float]:
    """The workers' evaluations together: greedy reward mean and pass@k (k = `samples`), the
    oldest version evaluated, and reward functions that failed."""
    greedy = [r for res in results for r in res.greedy_rewards]
    passed = [p for res in results for p in res.passed]
    return {"eval/reward_mean": sum(greedy) / len(greedy), f"eval/pass@{samples}": sum(passed) / len(passed),
            "eval/version": min(res.version for res in results),
            "eval/reward_failures": sum(res.reward_failures for res in results)}


def step_metrics(rollout: dict, train: dict, pub: PublishStats, sync_stats: list[SyncStats], times: dict, version: int,
                 trainer_restarts: int) -> dict[str, float]:
    """Every metric of one RL step, by its logged name (steps.jsonl, wandb): the trainer's under
    train/, except distill/* (the distillation term), named as in pretraining."""
    metrics = {
        **rollout, **{k if k.startswith("distill/") else f"train/{k}": v for k, v in train.items() if k != "step"},
        "sync/payload_bytes": pub.payload_bytes, "sync/dense_bytes": pub.dense_bytes,
        "sync/ratio": pub.dense_bytes / max(1, pub.payload_bytes),
        "sync/encode_s": pub.encode_s, "density": pub.density,
        **times, "version": version, "trainer/restarts": trainer_restarts,
    }
    # Behavioural parity of the rollout engine: |engine logprob - trainer logprob| of the sampled
    # tokens of the rows the trained weights produced (the trainer recomputes them for the loss).
    if "logprob_mismatch" in train:
        metrics["rollout/logprob_diff"] = train["logprob_mismatch"]
        metrics["rollout/logprob_diff_max"] = train["logprob_mismatch_max"]
    pauses = [st.pause_s for st in sync_stats if st.pause_s is not None]  # async swaps
    if pauses:
        metrics["sync/pause_s"] = max(pauses)
    waits = [st.weights_wait_s for st in sync_stats if st.weights_wait_s is not None]
    if waits:
        metrics["sync/weights_wait_s"] = max(waits)
    return metrics


def remember(history: dict[str, list[float]], metrics: dict[str, float]) -> dict[str, float]:
    """Append to the history (what summary.json is made of); returns `metrics`."""
    for k, v in metrics.items():
        history.setdefault(k, []).append(float(v))
    return metrics


def window_mean(values: list[float], first: bool) -> float:
    k = max(1, math.ceil(len(values) / 10))
    part = values[:k] if first else values[-k:]
    return sum(part) / len(part)


def make_summary(cfg: "RLJobConfig", history: dict, totals: dict, version: int, final_versions: list,
                 restarts: int, trainer_restarts: int = 0, **times) -> dict:
    rewards = history.get("reward/mean", [])
    ratios = history.get("sync/ratio", [])
    mean = lambda k: (sum(history[k]) / len(history[k])) if history.get(k) else None  # noqa: E731
    return {
        "mode": cfg.rl.mode, "algo": cfg.algo.name, "task": cfg.task.name, "sparsity_method": cfg.sparsity.method,
        "distill": cfg.distill.name,
        "rl_steps": len(rewards),
        "reward.first_10pct": window_mean(rewards, True) if rewards else None,
        "reward.last_10pct": window_mean(rewards, False) if rewards else None,
        "sync.payload_bytes": totals["payload"], "sync.dense_bytes": totals["dense"],
        "sync.ratio": totals["dense"] / max(1, totals["payload"]),
        "sync.ratio_mean": sum(ratios) / len(ratios) if ratios else None,
        "sync.snapshot_payload_bytes": totals["snapshot_payload"],
        "sync.checksum_mismatches": totals["mismatches"] + totals.get("verify_mismatches", 0),
        "sync.verify_checks": totals.get("verify_checks", 0),
        "sync.verify_mismatches": totals.get("verify_mismatches", 0),
        "sync.verify_engine_logprob_diff_max": totals.get("engine_logprob_diff_max"),
        "sync.seconds_mean": mean("sync/seconds"), "sync.pause_s_mean": mean("sync/pause_s"),
        "sync.encode_s_mean": mean("sync/encode_s"),
        "trainer.final_version": version, "rollout.final_versions": list(final_versions),
        "rollout.worker_restarts": restarts, "rollout.discarded_stale": totals["discarded"],
        "trainer.restarts": trainer_restarts, "rollout.dropped_lost_versions": totals.get("dropped_lost", 0),
        "staleness.mean": mean("staleness/mean"), "step_s_mean": mean("step_s"),
        "train.logprob_mismatch_mean": mean("train/logprob_mismatch"),
        "rollout.engine": cfg.rollout.engine,
        "rollout.logprob_diff_mean": (window_mean(history["rollout/logprob_diff"], False)
                                      if history.get("rollout/logprob_diff") else None),
        "rollout.logprob_diff_max": max(history["rollout/logprob_diff_max"]) if history.get("rollout/logprob_diff_max") else None,
        "density_final": history["density"][-1] if history.get("density") else None,
        "rollout.tokens_per_s_mean": mean("rollout/tokens_per_s"),
        "reward.failures": int(sum(history.get("reward/failures", []))),
        **{k: v[-1] for k, v in history.items() if k.startswith("eval/")},
        **{f"{k}_first": v[0] for k, v in history.items() if k in ("eval/reward_mean",) or k.startswith("eval/pass@")},
        **{k: round(v, 2) for k, v in times.items()},
    }
