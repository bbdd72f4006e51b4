"""The RL job with two trainer ranks: each rank publishes its own slice of the weights (sharded
sync), and every rollout worker ends bit-identical to the trainer, also with sparse policies."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster_nodes import HEAD_NODE, SECOND_NODE
from launch.rl import run_rl
from launch.rl_config import compose_rl_config

pytestmark = pytest.mark.ray

SMALL = ["model=gpt_tiny", "model.block_size=32", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
         "rl.sft_warmup_steps=2", "rl.log_every=1", "rl.lr_warmup_steps=0", "logger=console", "logger.console=false",
         "cluster.trainers=2", "cluster.cpus_per_trainer=0.5", "rollout.workers=2",
         f"+cluster.resources_per_trainer={{{HEAD_NODE}: 0.01}}", f"+rollout.resources={{{SECOND_NODE}: 0.01}}"]


@pytest.mark.parametrize("sparsity", ["dense", "nm"])
def test_two_trainer_ranks_publish_slices_and_workers_end_bit_identical(ray_cluster, tmp_path, sparsity):
    import ray

    seen = {}

    def check_workers(step, job):
        if step == 4:  # the workers' own tensors, independently of the sync checksums
            seen["weights"] = ray.get(job.rollouts.workers[0].weights.remote())

    summary = run_rl(compose_rl_config([*SMALL, f"sparsity={sparsity}", "rl.steps=4"]), tmp_path, on_step=check_workers)
    assert summary["sync.checksum_mismatches"] == 0
    assert summary["rollout.final_versions"] == [summary["trainer.final_version"]] * 2 == [6, 6]
    assert 0 < summary["sync.payload_bytes"]
    final = load_file(str(tmp_path / "model.safetensors"))  # the trainer's export (fp32 masters, masked)
    for name, w in seen["weights"].items():
        assert torch.equal(w.view(torch.int16), final[name].to(torch.bfloat16).view(torch.int16)), name
    if sparsity == "nm":  # 2:4 along the input dim of every sparsified matrix, as the workers hold it
        info = json.loads((tmp_path / "sparsity.json").read_text())
        assert info["tensors"]
        for name in info["tensors"]:
            w = seen["weights"][name].float()
            assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all(), name
