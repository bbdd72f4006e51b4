"""The RL job end to end, in-process on the shared two-node Ray cluster: the trainer on the head
node, rollout workers on the second; sync mode with a rollout worker killed mid-run, async mode
with bounded staleness, and sparsity applied during RL."""
from __future__ import annotations

import json

import pytest

from cluster_nodes import HEAD_NODE, SECOND_NODE
from launch.rl import run_rl
from launch.rl_config import compose_rl_config

pytestmark = pytest.mark.ray

SMALL = ["model=gpt_tiny", "model.block_size=32", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
         "rl.sft_warmup_steps=3", "rl.log_every=1", "rl.lr_warmup_steps=0", "logger=console", "logger.console=false",
         f"+cluster.resources_per_trainer={{{HEAD_NODE}: 0.01}}", f"+rollout.resources={{{SECOND_NODE}: 0.01}}"]


def small_config(*overrides: str):
    return compose_rl_config([*SMALL, *overrides])


def steps_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_sync_mode_two_nodes_survives_a_killed_rollout_worker(ray_cluster, tmp_path):
    import ray

    killed = []

    def kill_once(step, job):
        if step == 3 and not killed:
            ray.kill(job.rollouts.workers[1], no_restart=True)
            killed.append(step)

    summary = run_rl(small_config("rl.steps=6"), tmp_path, on_step=kill_once)
    assert killed == [3]
    assert summary["rollout.worker_restarts"] >= 1
    assert summary["trainer.final_version"] == 3 + 6  # warm-up steps count as versions
    assert summary["rollout.final_versions"] == [9, 9]
    assert summary["sync.checksum_mismatches"] == 0 and summary["rollout.corrupt_resyncs"] == 0
    assert 0 < summary["sync.payload_bytes"] < summary["sync.dense_bytes"]
    assert summary["sync.snapshot_payload_bytes"] > 0
    rows = steps_of(tmp_path)
    assert [r["version"] for r in rows] == list(range(4, 10))
    assert all(r["staleness/max"] == 0 for r in rows)  # sync mode: always the trainer's version
    for key in ("reward/mean", "sync/payload_bytes", "sync/dense_bytes", "sync/ratio", "sync/seconds",
                "train/logprob_mismatch", "rollout/tokens_per_s", "response/length_mean"):
        assert key in rows[-1], key
    # Same weights on both sides: only numerics (bf16 rollout vs fp32 trainer) separate the logprobs.
    assert max(r["train/logprob_mismatch"] for r in rows) < 0.05
    assert json.loads((tmp_path / "summary.json").read_text())["trainer.final_version"] == 9


def test_async_mode_bounds_staleness_and_ends_in_sync(ray_cluster, tmp_path):
    summary = run_rl(small_config("rl.mode=async", "rl.steps=8", "rl.max_staleness=1", "rl.eval_every=4",
                                  "task.eval_prompts=4", "rl.eval_samples=2"), tmp_path)
    rows = steps_of(tmp_path)
    # Evaluation between async steps: each worker evaluates the weights it holds (at most 1 behind).
    evals = [r for r in rows if "eval/pass@2" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(r["version"] - r["eval/version"] <= 1 for r in evals)
    assert "eval/reward_mean" in summary and "eval/pass@2" in summary
    assert all(r["staleness/max"] <= 1 for r in rows)
    assert any(r["staleness/max"] == 1 for r in rows)  # async really overlapped
    assert any("sync/pause_s" in r for r in rows)  # the swap was measured
    assert summary["rollout.final_versions"] == [summary["trainer.final_version"]] * 2
    assert summary["sync.checksum_mismatches"] == 0
    assert summary["rollout.worker_restarts"] == 0


def test_sparse_policy_with_ppo_reaches_the_workers_exactly_2_of_4(ray_cluster, tmp_path):
    import ray

    captured = {}

    def grab(step, job):
        if step == 4:
            captured["state"] = ray.get(job.rollouts.workers[0].weights.remote())

    cfg = small_config("rl.steps=4", "sparsity=nm", "algo=ppo", "algo.kl_coef=0.05")
    summary = run_rl(cfg, tmp_path, on_step=grab)
    assert summary["sync.checksum_mismatches"] == 0 and summary["algo"] == "ppo"
    assert "train/kl" in steps_of(tmp_path)[-1]
    state = captured["state"]
    linears = [n for n, w in state.items() if n.startswith("h.") and w.dim() == 2]
    assert len(linears) == 4 * cfg.model.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    for name in linears:
        groups = (state[name].reshape(state[name].shape[0], -1, 4) != 0).sum(-1)
        assert int(groups.max()) <= 2, name
        assert (groups == 2).float().mean() > 0.99, name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_default_demo_learns(ray_cluster, tmp_path, mode):
    """The embedded demo's recipe (conf/rl.yaml) shows learning: +0.3 reward, all in sync."""
    cfg = compose_rl_config([f"rl.mode={mode}", "logger=console", "logger.console=false",
                             f"+cluster.resources_per_trainer={{{HEAD_NODE}: 0.01}}",
                             f"+rollout.resources={{{SECOND_NODE}: 0.01}}"])
    summary = run_rl(cfg, tmp_path)
    assert summary["reward.last_10pct"] >= summary["reward.first_10pct"] + 0.3
    assert summary["rollout.final_versions"] == [summary["trainer.final_version"]] * 2
    assert summary["sync.checksum_mismatches"] == 0


def test_a_crashed_job_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    """Run 4 RL steps with a checkpoint every 2, 'crash' (the job ends), resume to 6 steps."""
    from launch.rl_config import RLConfigError

    first = run_rl(small_config("rl.steps=4", "rl.checkpoint_every=2"), tmp_path)
    assert first["trainer.final_version"] == 3 + 4
    with pytest.raises(RLConfigError, match="rl.resume=auto"):
        run_rl(small_config("rl.steps=6"), tmp_path)  # checkpoints present: never overwritten silently
    resumed = run_rl(small_config("rl.steps=6", "rl.checkpoint_every=2", "rl.resume=auto"), tmp_path)
    assert resumed["trainer.final_version"] == 3 + 6
    assert resumed["rollout.final_versions"] == [9, 9] and resumed["sync.checksum_mismatches"] == 0
    assert resumed["rl_steps"] == 6  # the reward history carried over
    assert [r["step"] for r in steps_of(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [r["version"] for r in steps_of(tmp_path)] == list(range(4, 10))
