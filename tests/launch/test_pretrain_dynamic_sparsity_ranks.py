"""Dynamic sparse training under data parallelism: every rank must grow and drop the same weights
(RigL scores its growth with the all-reduced dense gradient; SET draws from a shared generator),
or the ranks' models silently diverge. Two ranks, ZeRO-1 and ZeRO-2, masks compared rank by rank
from the per-rank checkpoint files."""
from __future__ import annotations

import pytest
import torch

from launch.config import compose_pretrain_config
from launch.pretrain import run_pretrain
from trainer.checkpoint import latest_checkpoint, load_rank_state

TINY = ["model=gpt_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=4", "trainer.eval_batches=1",
        "data.max_bytes=200000", "optimizer.warmup_steps=1", "optimizer.lr=3e-3", "logger=console",
        "logger.console=false", "cluster.trainers=2", "cluster.cpus_per_trainer=1", "trainer.max_steps=6",
        "trainer.checkpoint_every=6", "trainer.eval_every=6", "export=false"]


@pytest.mark.ray
@pytest.mark.parametrize("method, zero_stage", [("rigl", 1), ("set", 2)])
def test_every_rank_ends_with_the_same_masks(ray_cluster, tmp_path, method, zero_stage):
    cfg = compose_pretrain_config([*TINY, f"sparsity={method}", "sparsity.density=0.3",
                                   "sparsity.update_interval=2", "sparsity.end_fraction=1.0",
                                   f"trainer.zero_stage={zero_stage}"])
    run_pretrain(cfg, tmp_path)
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    states = [load_rank_state(checkpoint, r)["sparsity"] for r in range(2)]
    layers = states[0]["layers"]
    assert layers and states[0]["step"] == states[1]["step"]
    changed = 0
    for name, layer in layers.items():
        assert torch.equal(layer["mask"], states[1]["layers"][name]["mask"]), f"{name}: ranks' masks differ"
        changed += int((layer["mask"] != layer["initial_mask"]).sum())
    assert changed > 0, "no mask update happened: the test would not see diverging ranks"
