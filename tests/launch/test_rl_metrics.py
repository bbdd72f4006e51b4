"""The driver's pure metric functions against values computed here: per-rank merging, per-micro-
batch sums, one step's metrics and the summary (launch/rl_metrics.py, launch/trainer_group.py)."""
from __future__ import annotations

import math

import pytest

from launch.rl_metrics import make_summary, step_metrics
from launch.rl_config import compose_rl_config
from launch.trainer_group import merge_metrics
from sync.payloads import PublishStats, SyncStats
from trainer.worker import _MetricSums


def test_merge_metrics_sums_sums_takes_maxima_and_averages_the_ranks_that_report():
    per_rank = [{"sum/tokens": 10, "loss": 1.0, "logprob_mismatch_max": 0.2, "logprob_mismatch": 0.1},
                {"sum/tokens": 5, "loss": 3.0, "logprob_mismatch_max": 0.5}]
    out = merge_metrics(per_rank)
    assert out == {"sum/tokens": 15, "loss": 2.0, "logprob_mismatch_max": 0.5, "logprob_mismatch": 0.1}


def test_micro_batch_sums_average_each_key_over_the_micro_batches_that_report_it():
    sums = _MetricSums()
    sums.add({"loss": 1.0, "sum/rows": 4, "logprob_mismatch": 0.3, "logprob_mismatch_max": 0.9})
    sums.add({"loss": 2.0, "sum/rows": 4})  # no row of the current version: no mismatch reported
    sums.add({"loss": 6.0, "sum/rows": 2, "logprob_mismatch": 0.1, "logprob_mismatch_max": 0.4})
    assert sums.result() == pytest.approx({"loss": 3.0, "sum/rows": 10, "logprob_mismatch": 0.2,
                                           "logprob_mismatch_max": 0.9})


def test_step_metrics_name_the_engine_parity_and_the_sync_ratio():
    pub = PublishStats(version=7, kind="delta", dense=False, payload_bytes=100, dense_bytes=2500, ratio=25.0,
                       changed=10, encode_s=0.01, parts=1, checksum="c", density=1.0)
    def swap(**timings) -> SyncStats:
        return SyncStats(version=7, kind="delta", payload_bytes=100, transfer_s=0.0, decode_s=0.0, apply_s=0.0,
                         staged_bytes=0, checksum="c", **timings)

    sync_stats = [swap(pause_s=0.2, weights_wait_s=0.1), swap(pause_s=0.5), swap()]
    metrics = step_metrics({"reward/mean": 0.5}, {"loss": 1.0, "logprob_mismatch": 0.003, "logprob_mismatch_max": 0.04,
                                                  "distill/kl": 0.2},
                           pub, sync_stats, {"step_s": 1.5}, version=7, trainer_restarts=0)
    assert metrics["rollout/logprob_diff"] == 0.003 and metrics["rollout/logprob_diff_max"] == 0.04
    assert metrics["train/loss"] == 1.0 and metrics["distill/kl"] == 0.2
    assert metrics["sync/ratio"] == 25.0 and metrics["sync/pause_s"] == 0.5 and metrics["sync/weights_wait_s"] == 0.1
    assert "rollout/logprob_diff" not in step_metrics({}, {"loss": 1.0}, pub, [], {}, 7, 0)


def test_summary_takes_the_last_tenth_of_steps_and_counts_failed_weight_checks():
    cfg = compose_rl_config(["rollout.engine=torch"])
    diffs = [0.5] * 18 + [0.01, 0.03]  # 20 steps: the last ceil(20 / 10) = 2
    history = {"reward/mean": [float(i) for i in range(20)], "rollout/logprob_diff": diffs,
               "rollout/logprob_diff_max": [0.1] * 19 + [0.7], "sync/ratio": [10.0] * 20}
    totals = {"payload": 10, "dense": 200, "snapshot_payload": 0, "mismatches": 1, "discarded": 0,
              "dropped_lost": 0, "verify_checks": 6, "verify_mismatches": 2}
    s = make_summary(cfg, history, totals, 20, [20, 20], 0)
    assert s["rollout.engine"] == "torch"
    assert s["rollout.logprob_diff_mean"] == pytest.approx(0.02) and s["rollout.logprob_diff_max"] == 0.7
    assert s["reward.first_10pct"] == pytest.approx(0.5) and s["reward.last_10pct"] == pytest.approx(18.5)
    assert s["sync.checksum_mismatches"] == 3 and s["sync.verify_checks"] == 6 and s["sync.verify_mismatches"] == 2
    assert s["sync.ratio"] == 20.0
    assert math.isclose(s["sync.ratio_mean"], 10.0)


def test_verify_workers_counts_a_wrong_digest_and_an_engine_off_its_weights():
    from types import SimpleNamespace

    from launch.rl_job import RLJob
    from launch.rl_metrics import new_totals
    from rollout.results import WeightCheck

    cfg = compose_rl_config(["rollout.engine=torch"])
    checks = [WeightCheck(5, "good"), WeightCheck(5, "bad"), WeightCheck(5, "good", 0.2), WeightCheck(5, "good", 0.001)]
    resynced = []
    job = SimpleNamespace(cfg=cfg, checksums={5: "good"}, state=SimpleNamespace(totals=new_totals()),
                          rollouts=SimpleNamespace(verify_all=lambda: checks,
                                                   resync_snapshot=lambda i, reason: resynced.append(i)))
    bad, versions = RLJob.verify_workers(job)
    assert bad == 2 and versions == [5] * 4  # the wrong digest, and the engine 0.2 off (> 0.05)
    assert resynced == [1]  # the worker whose re-read weights were wrong is restored by snapshot
    assert job.state.totals["verify_checks"] == 4 and job.state.totals["verify_mismatches"] == 2
    assert job.state.totals["engine_logprob_diff_max"] == 0.2
