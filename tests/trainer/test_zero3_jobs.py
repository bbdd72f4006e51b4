"""The pretraining job with two trainer ranks under ZeRO-3 and a sparse method, on the shared Ray
cluster: it trains, both ranks end with the same masks (per-rank checkpoint files), and the export
is exactly 2:4 (N:M) or exactly at the layer budget with nonzeros only inside the mask (RigL)."""
from __future__ import annotations

import json

import pytest
import torch

from launch.config import compose_pretrain_config
from launch.pretrain import run_pretrain
from trainer.checkpoint import latest_checkpoint, load_rank_state

TINY = ["model=gpt_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=4", "trainer.eval_batches=1",
        "data.max_bytes=200000", "optimizer.warmup_steps=1", "optimizer.lr=3e-3", "logger=console",
        "logger.console=false", "cluster.trainers=2", "cluster.cpus_per_trainer=1", "trainer.max_steps=6",
        "trainer.checkpoint_every=6", "trainer.eval_every=6", "trainer.zero_stage=3"]


@pytest.mark.ray
@pytest.mark.parametrize("method", ["nm", "rigl"])
def test_pretrain_two_ranks_zero3_exports_the_sparse_pattern(ray_cluster, tmp_path, method):
    from safetensors.torch import load_file

    extra = ["sparsity.density=0.3", "sparsity.update_interval=2", "sparsity.end_fraction=1.0"] if method == "rigl" else []
    summary = run_pretrain(compose_pretrain_config([*TINY, f"sparsity={method}", *extra]), tmp_path)
    assert summary["steps"] == 6 and summary["world_size"] == 2
    assert summary["train/loss_final"] < 5.5  # from ln(259) = 5.56: it trained

    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    states = [load_rank_state(checkpoint, r)["sparsity"] for r in range(2)]
    masks = {name: layer["mask"] for name, layer in states[0]["layers"].items()}
    assert len(masks) == 8
    for name, mask in masks.items():
        assert torch.equal(mask, states[1]["layers"][name]["mask"]), f"{name}: the ranks' masks differ"

    exported = load_file(str(tmp_path / "model.safetensors"))
    info = json.loads((tmp_path / "sparsity.json").read_text())
    assert info["method"] == method and set(info["tensors"]) == set(masks)
    for name, mask in masks.items():
        weight = exported[name]
        assert torch.count_nonzero(weight[~mask]) == 0, name
        if method == "nm":
            groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
            assert int(groups.max()) <= 2 and (groups == 2).float().mean() > 0.99, name
            assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            layer = states[0]["layers"][name]
            assert int(mask.sum()) == layer["extra"]["active"] == round(layer["extra"]["density"] * mask.numel())
    if method == "rigl":
        assert sum(int((layer["mask"] != layer["initial_mask"]).sum()) for layer in states[0]["layers"].values()) > 0


@pytest.mark.ray
@pytest.mark.parametrize("method", ["nm", "rigl"])
def test_rl_two_ranks_zero3_sparse_workers_end_identical(ray_cluster, tmp_path, method):
    """RL with PPO and a KL reference (a frozen copy of the partitioned policy), two ZeRO-3 trainer
    ranks: every publish reaches the rollout workers, which end bit-identical to the trainer
    (checksums), with the sparse pattern."""
    import ray

    from cluster_nodes import HEAD_NODE, SECOND_NODE
    from launch.rl import run_rl
    from launch.rl_config import compose_rl_config

    captured = {}

    def grab(step, job):
        captured["state"] = ray.get(job.rollouts.workers[0].weights.remote())

    extra = ["sparsity.density=0.3", "sparsity.update_interval=2", "sparsity.end_fraction=1.0"] if method == "rigl" else []
    cfg = compose_rl_config([
        "model=gpt_tiny", "model.block_size=32", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "rl.sft_warmup_steps=2", "rl.steps=3", "rl.lr_warmup_steps=0", "logger=console", "logger.console=false",
        "cluster.trainers=2", "trainer.zero_stage=3", f"sparsity={method}", *extra, "algo=ppo", "algo.kl_coef=0.05",
        f"+cluster.resources_per_trainer={{{HEAD_NODE}: 0.01}}", f"+rollout.resources={{{SECOND_NODE}: 0.01}}"])
    summary = run_rl(cfg, tmp_path, on_step=grab)
    assert summary["sync.checksum_mismatches"] == 0
    assert summary["rollout.final_versions"] == [summary["trainer.final_version"]] * 2 == [2 + 3] * 2
    state = captured["state"]
    linears = [n for n, w in state.items() if n.startswith("h.") and w.dim() == 2]
    assert len(linears) == 4 * cfg.model.n_layer
    if method == "nm":
        for name in linears:
            groups = (state[name].reshape(state[name].shape[0], -1, 4) != 0).sum(-1)
            assert int(groups.max()) <= 2 and (groups == 2).float().mean() > 0.99, name
    else:  # ERK spreads the 30 % budget unevenly over the layers; their total is at most the budget
        nonzero = sum(int(torch.count_nonzero(state[n])) for n in linears)
        total = sum(state[n].numel() for n in linears)
        assert 0.15 * total < nonzero <= round(0.3 * total) + len(linears)  # grown weights start at 0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("case", ["scl", "nm_transposable", "nm_bidirectional"])
def test_pretrain_two_ranks_zero3_learned_and_backward_nm_masks_agree(ray_cluster, tmp_path, case):
    """SCL's mask variables and Bi-Mask's backward masks are computed outside DeepSpeed: under
    ZeRO-3 both ranks must still end with the same ones, and the export keeps the pattern."""
    from safetensors.torch import load_file

    extra = {"scl": ["sparsity=scl", "sparsity.density=0.5", "sparsity.end_fraction=0.5",
                     "sparsity.fine_tune_fraction=0.0"],
             "nm_transposable": ["sparsity=nm", "sparsity.backward=transposable"],
             "nm_bidirectional": ["sparsity=nm", "sparsity.backward=bidirectional"]}[case]
    summary = run_pretrain(compose_pretrain_config([*TINY, *extra]), tmp_path)
    assert summary["steps"] == 6 and summary["train/loss_final"] < 5.5
    assert "sparsity/backward_density" in summary if case != "scl" else "sparsity/scl_lambda" in summary

    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    states = [load_rank_state(checkpoint, r)["sparsity"] for r in range(2)]
    masks = {name: layer["mask"] for name, layer in states[0]["layers"].items()}
    for name, mask in masks.items():
        assert torch.equal(mask, states[1]["layers"][name]["mask"]), f"{name}: the ranks' masks differ"
        if case == "scl":
            assert torch.equal(states[0]["family"]["scores"][name], states[1]["family"]["scores"][name])
        if case == "nm_bidirectional":
            b0, b1 = (s["family"]["backward_masks"][name] for s in states)
            assert b0 is not None and torch.equal(b0, b1) and not (b0 & ~mask).any()
    if case == "scl":
        density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert density < 1.0  # the masks learned something in 6 steps
    exported = load_file(str(tmp_path / "model.safetensors"))
    for name, mask in masks.items():
        weight = exported[name]
        assert torch.count_nonzero(weight[~mask]) == 0, name
        if case == "nm_transposable":
            for dim in (0, 1):
                assert int((weight.movedim(dim, -1).reshape(-1, 4) != 0).sum(-1).max()) <= 2, name


@pytest.mark.ray
@pytest.mark.slow
def test_rl_zero3_scl_masks_freeze_when_rl_starts(ray_cluster, tmp_path):
    """sparsity.scl_freeze_in_rl (default true): SCL masks learn during the SFT warm-up and stop
    at the first RL step; the rollout workers' zero pattern is the same at every RL step."""
    import ray

    from cluster_nodes import HEAD_NODE, SECOND_NODE
    from launch.rl import run_rl
    from launch.rl_config import compose_rl_config

    patterns = []

    def grab(step, job):
        state = ray.get(job.rollouts.workers[0].weights.remote())
        patterns.append({n: w != 0 for n, w in state.items() if n.startswith("h.") and w.dim() == 2})

    cfg = compose_rl_config([
        "model=gpt_tiny", "model.block_size=32", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "rl.sft_warmup_steps=3", "rl.steps=3", "rl.lr_warmup_steps=0", "logger=console", "logger.console=false",
        "cluster.trainers=2", "trainer.zero_stage=3", "sparsity=scl", "sparsity.density=0.5",
        "sparsity.end_fraction=0.5", "sparsity.fine_tune_fraction=0.0", "sparsity.scl_mask_init=0.05",
        "algo=ppo", "algo.kl_coef=0.05",
        f"+cluster.resources_per_trainer={{{HEAD_NODE}: 0.01}}", f"+rollout.resources={{{SECOND_NODE}: 0.01}}"])
    summary = run_rl(cfg, tmp_path, on_step=grab)  # m_0 = 0.05: masks move within the 3 SFT steps
    assert summary["sync.checksum_mismatches"] == 0
    assert len(patterns) == 3
    density = sum(int(p.sum()) for p in patterns[0].values()) / sum(p.numel() for p in patterns[0].values())
    assert density < 0.95  # the masks learned during the SFT warm-up
    for later in patterns[1:]:
        for name, mask in patterns[0].items():
            assert torch.equal(mask, later[name]), name
