"""The RL job with rollout.engine=vllm end to end on a tiny Llama (examples/arith/make_data.py
--tiny-hf): rollout workers generate with vLLM and receive every sparse delta into it; the
engine's logprobs agree with the trainer's, the workers' final weights (re-read, exported) are
bit-identical to the trainer's export, and a killed worker is replaced and caught up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from launch.rl import run_rl  # noqa: E402
from launch.rl_config import compose_rl_config  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
ARITH = ROOT / "examples" / "arith"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, str(ARITH / "make_data.py"), "--out", str(out / "data"), "--tiny-hf", str(out / "model")],
                   check=True, capture_output=True)
    return out / "model"


def vllm_config(model_dir: Path, *overrides: str):
    return compose_rl_config([
        "model=hf", f"model.path={model_dir}", "rollout.engine=vllm", "task=dataset",
        f"task.path={ARITH / 'train.parquet'}", f"task.reward_fns=[{ARITH / 'reward.py'}:score]",
        "sync.mode=sparse", "rollout.export_final=true", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "rollout.vllm.kv_cache_memory_bytes=67108864", "rl.sft_warmup_steps=2", "rl.log_every=1", "rl.lr_warmup_steps=0",
        "rl.checkpoint_every=0", "logger=console", "logger.console=false", "sync.verify_every=2", *overrides])


def assert_workers_match_the_export(run_dir: Path, workers: int) -> None:
    from safetensors.torch import load_file

    exported = load_file(str(run_dir / "model.safetensors"))
    for i in range(workers):
        path = run_dir / "rollout_final" / f"worker_{i}" / "model.safetensors"
        assert path.read_bytes() == (run_dir / "model.safetensors").read_bytes(), path  # the files, byte for byte
        state = load_file(str(path))
        assert sorted(state) == sorted(exported)
        for name, t in exported.items():
            assert t.dtype == torch.bfloat16 and torch.equal(state[name].view(torch.int16), t.view(torch.int16)), name


def test_rl_on_vllm_receives_sparse_deltas_exactly_and_survives_a_killed_worker(ray_cluster, tiny_llama, tmp_path):
    import ray

    killed = []

    def kill_once(step, job):
        if step == 2 and not killed:
            ray.kill(job.rollouts.workers[1], no_restart=True)
            killed.append(step)

    summary = run_rl(vllm_config(tiny_llama, "rl.steps=4"), tmp_path, on_step=kill_once)
    assert summary["rollout.engine"] == "vllm"
    assert summary["rollout.worker_restarts"] == 1
    assert summary["rollout.final_versions"] == [summary["trainer.final_version"]] * 2 == [6, 6]
    assert 0 < summary["sync.payload_bytes"] < summary["sync.dense_bytes"]
    assert summary["sync.checksum_mismatches"] == 0 and summary["sync.verify_mismatches"] == 0
    assert summary["sync.verify_checks"] == 2 * 2 + 2  # steps 2 and 4, and the end
    assert summary["sync.verify_engine_logprob_diff_max"] < 0.05  # each engine against its committed weights
    assert summary["rollout.logprob_diff_mean"] is not None and summary["rollout.logprob_diff_mean"] <= 0.05
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert all(r["rollout/logprob_diff"] <= 0.05 for r in rows)
    assert_workers_match_the_export(tmp_path, 2)


def test_rl_on_vllm_async_with_a_2_4_policy(ray_cluster, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    summary = run_rl(vllm_config(tiny_llama, "rl.steps=4", "rl.mode=async", "sparsity=nm"), tmp_path)
    assert summary["rollout.engine"] == "vllm" and summary["mode"] == "async"
    assert summary["sync.checksum_mismatches"] == 0
    assert summary["rollout.logprob_diff_mean"] <= 0.05
    assert_workers_match_the_export(tmp_path, 2)
    info = json.loads((tmp_path / "sparsity.json").read_text())
    worker = load_file(str(tmp_path / "rollout_final" / "worker_0" / "model.safetensors"))
    for name in info["tensors"]:  # exactly 2 of every 4 along the input dim, as the engine was handed them
        nonzero = (worker[name].float().reshape(-1, 4) != 0).sum(1)
        assert (nonzero <= 2).all(), name


def test_rl_engine_vllm_refuses_bad_input_before_ray_starts(tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    from launch.rl_job import plan_run
    from launch.rl_config import RLConfigError
    from rollout.config import RolloutConfigError

    with pytest.raises(RLConfigError, match="rollout.engine=vllm needs model=hf"):
        plan_run(compose_rl_config(["rollout.engine=vllm"]), tmp_path)
    import shutil

    mistral = tmp_path / "not-verified"
    shutil.copytree(tiny_llama, mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(RLConfigError, match="MistralForCausalLM.*rollout.engine=torch"):
        plan_run(vllm_config(mistral), tmp_path / "run")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(RolloutConfigError, match="vLLM is not installed.*scripts/setup.sh"):
        plan_run(vllm_config(tiny_llama), tmp_path)
