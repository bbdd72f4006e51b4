"""The pretraining job end to end: the CLI in a subprocess, and `run_pretrain` in-process on the
shared two-node Ray cluster (multi-node placement, resume equality, bad input)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import DataError
from launch.cluster import ClusterResourceError
from launch.config import compose_pretrain_config
from launch.pretrain import ResumeError, run_pretrain
from trainer.checkpoint import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from wandb_records import wandb_history  # noqa: E402

TINY = ["model=gpt_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=4", "trainer.eval_batches=2",
        "data.max_bytes=300000", "optimizer.warmup_steps=2", "optimizer.lr=3e-3", "trainer.log_every=1"]


def tiny_config(*overrides: str):
    return compose_pretrain_config([*TINY, "logger=console", "logger.console=false", *overrides])


def assert_exactly_2_of_4(state: dict[str, torch.Tensor], names: list[str]) -> None:
    for name in names:
        w = state[name]
        nonzero_per_group = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert int(nonzero_per_group.max()) <= 2, name
        assert (nonzero_per_group == 2).float().mean() > 0.99, name  # pruned entries exactly 0, kept ones not


def test_cli_end_to_end_sparse_two_ranks(tmp_path):
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "launch.pretrain", *TINY, "sparsity=nm", "cluster.trainers=2",
           "trainer.max_steps=8", "trainer.eval_every=4", "trainer.checkpoint_every=4", f"hydra.run.dir={tmp_path}"]
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    # the ranks end killed by Ray: DeepSpeed's CPU allreduce buffers must not outlive them
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 2 and summary["sparsity_method"] == "nm"
    assert summary["eval/loss_final"] < summary["eval/loss_first"] - 0.5
    assert summary["sparsity/density"] == pytest.approx(0.5)
    # gpt_tiny (d 64, 2 layers, vocab 259), window 32: block linears 12 d^2 at 2:4, attention scores
    # 2 d (32 + 1) / 2 per layer, head d * vocab; 2 FLOPs per multiply-add
    d = 64
    assert summary["model.flops_per_token"] == 2 * (2 * (12 * d * d * 0.5 + 2 * d * 33 / 2) + d * 259)
    assert summary["model.params_total"] == sum(v.numel() for v in load_file(str(tmp_path / "model.safetensors")).values())
    state = load_file(str(tmp_path / "model.safetensors"))
    linears = [n for n in state if n.startswith("h.") and state[n].dim() == 2]
    assert len(linears) == 8
    assert_exactly_2_of_4(state, linears)
    assert json.loads((tmp_path / "config.json").read_text())["gpt_config"]["n_layer"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    rows = wandb_history(tmp_path)
    logged = {k for r in rows for k in r}
    assert {"train/loss", "eval/loss", "lr", "tokens_per_s", "sparsity/density", "sparsity/sad"} <= logged
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert evals[0] == pytest.approx(summary["eval/loss_first"]) and evals[-1] == pytest.approx(summary["eval/loss_final"])
    assert "train:" in out.stderr  # the progress bar


@pytest.fixture(scope="module")
def two_node_run(ray_cluster, tmp_path_factory):
    """8 steps, one trainer rank on each node, checkpoints at 4 and 8 kept."""
    run_dir = tmp_path_factory.mktemp("two_node_run")
    cfg = tiny_config("sparsity=nm", "cluster.trainers=2", "cluster.placement_strategy=STRICT_SPREAD",
                      "cluster.cpus_per_trainer=1", "trainer.max_steps=8", "trainer.checkpoint_every=4",
                      "trainer.keep_checkpoints=0", "trainer.eval_every=4")
    return run_dir, run_pretrain(cfg, run_dir)


@pytest.mark.ray
def test_multi_node_one_rank_per_node(two_node_run, ray_cluster):
    run_dir, summary = two_node_run
    assert summary["steps"] == 8 and summary["world_size"] == 2
    assert len(set(summary["trainer_nodes"])) == 2  # the ranks sat on different Ray nodes
    assert summary["eval/loss_final"] < summary["eval/loss_first"]
    assert (run_dir / "model.safetensors").exists()


@pytest.mark.ray
def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(two_node_run, ray_cluster, tmp_path):
    from safetensors.torch import load_file

    full_dir, full = two_node_run
    # A run that got as far as its step-4 checkpoint (what a killed job leaves behind).
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(full_dir / "checkpoints" / "step_00000004", tmp_path / "checkpoints" / "step_00000004")
    cfg = tiny_config("sparsity=nm", "cluster.trainers=2", "trainer.max_steps=8", "trainer.checkpoint_every=4",
                      "trainer.keep_checkpoints=0", "trainer.eval_every=4", "resume=auto")
    resumed = run_pretrain(cfg, tmp_path)
    assert resumed["resumed_from"].endswith("step_00000004")
    assert resumed["eval/loss_first"] == full["eval/loss_first"]  # carried in the checkpoint
    assert resumed["train/loss_final"] == pytest.approx(full["train/loss_final"], rel=1e-6, abs=1e-6)
    assert resumed["eval/loss_final"] == pytest.approx(full["eval/loss_final"], rel=1e-6, abs=1e-6)
    a, b = load_file(str(full_dir / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)


@pytest.mark.ray
def test_more_trainers_than_resources_is_a_clear_error(ray_cluster, tmp_path):
    cfg = tiny_config("cluster.trainers=3", "cluster.cpus_per_trainer=4", "trainer.max_steps=2")
    with pytest.raises(ClusterResourceError, match="CPU: need 12, cluster has 8"):
        run_pretrain(cfg, tmp_path)
    # Fits the totals, but no single node has 5 CPUs: bounded wait, then the same kind of error.
    cfg = tiny_config("cluster.trainers=1", "cluster.cpus_per_trainer=5", "cluster.placement_timeout_s=2",
                      "trainer.max_steps=2")
    with pytest.raises(ClusterResourceError, match="could not be placed within 2 s"):
        run_pretrain(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# Bad input that must fail before Ray starts (no fixture: these never reach ray.init).

def test_missing_data_path_fails_before_ray(tmp_path):
    cfg = tiny_config("data=text", f"data.paths=[{tmp_path}/nope/*.txt]")
    with pytest.raises(DataError, match="matches no file"):
        run_pretrain(cfg, tmp_path)


def test_empty_corpus_fails_before_ray(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = tiny_config("data=text", f"data.paths=[{tmp_path}/empty.txt]")
    with pytest.raises(DataError, match="corpus is empty"):
        run_pretrain(cfg, tmp_path)


@pytest.mark.ray
def test_corrupt_or_misfit_checkpoint_fails_before_ray(two_node_run, tmp_path):
    full_dir, _ = two_node_run
    ckpt = tmp_path / "checkpoints" / "step_00000008"
    shutil.copytree(full_dir / "checkpoints" / "step_00000008", ckpt)
    cfg = tiny_config("sparsity=nm", "cluster.trainers=2", "trainer.max_steps=8", "resume=auto")
    victim = next(p for p in sorted(ckpt.rglob("*.pt")))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_pretrain(cfg, tmp_path)
    # Same checkpoint, intact, but this run has another world size.
    shutil.rmtree(ckpt)
    shutil.copytree(full_dir / "checkpoints" / "step_00000008", ckpt)
    with pytest.raises(CheckpointError, match="world_size=2, this run has 1"):
        run_pretrain(tiny_config("sparsity=nm", "cluster.trainers=1", "trainer.max_steps=8", "resume=auto"), tmp_path)
    # resume=null with checkpoints present: refused, and the checkpoint is left as it was.
    before = {p: p.stat().st_size for p in ckpt.rglob("*")}
    with pytest.raises(ResumeError, match="resume=auto"):
        run_pretrain(tiny_config("sparsity=nm", "cluster.trainers=2", "trainer.max_steps=8"), tmp_path)
    assert {p: p.stat().st_size for p in ckpt.rglob("*")} == before


class _Poison:
    """Unpickling this runs code (it writes `marker`), as a crafted checkpoint file would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.ray
def test_poisoned_checkpoint_runs_no_code_on_resume_auto(two_node_run, tmp_path):
    """The attacker replaces DeepSpeed's model file with a code-running pickle and rewrites the
    manifest's size and digest to match: resume=auto refuses it and runs nothing."""
    from trainer.checkpoint import file_digest

    full_dir, _ = two_node_run
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    shutil.copytree(full_dir / "checkpoints" / "step_00000004", ckpt)
    marker = tmp_path / "marker"
    victim = "ds/mp_rank_00_model_states.pt"
    torch.save({"module": _Poison(marker), "optimizer": _Poison(marker)}, ckpt / victim)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][victim] = {"bytes": (ckpt / victim).stat().st_size, "xxh3_128": file_digest(ckpt / victim)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_config("sparsity=nm", "cluster.trainers=2", "trainer.max_steps=8", "trainer.checkpoint_every=4",
                      "resume=auto")
    with pytest.raises(CheckpointError, match="Weights only load failed"):
        run_pretrain(cfg, tmp_path)
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004"]  # nothing trained, nothing written


@pytest.mark.ray
def test_bit_flip_or_older_resume_fails_before_ray(two_node_run, tmp_path, monkeypatch):
    import launch.cluster

    full_dir, _ = two_node_run
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    shutil.copytree(full_dir / "checkpoints" / "step_00000004", ckpt)

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launch.cluster, "ray_cluster", no_ray)
    cfg = tiny_config("sparsity=nm", "cluster.trainers=2", "trainer.max_steps=8", "trainer.checkpoint_every=4",
                      "resume=auto")
    for rel in json.loads((ckpt / "manifest.json").read_text())["files"]:
        original = (ckpt / rel).read_bytes()
        (ckpt / rel).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit
        with pytest.raises(CheckpointError, match=f"{rel} is corrupt"):
            run_pretrain(cfg, tmp_path)
        (ckpt / rel).write_bytes(original)
    # An explicit resume of step 4 while step 8 exists would write step 8 again: refused up front.
    shutil.copytree(full_dir / "checkpoints" / "step_00000008", tmp_path / "checkpoints" / "step_00000008")
    with pytest.raises(ResumeError, match="newer checkpoints"):
        run_pretrain(tiny_config("sparsity=nm", "cluster.trainers=2", "trainer.max_steps=8", f"resume={ckpt}"), tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".staging-*"))
