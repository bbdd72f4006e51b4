"""Decoupled SR-STE through the real trainer step (TrainerWorker + DeepSpeed, one rank on gloo):
the same masters whatever the split into micro-batches, and bf16 weights still decay (the decay
acts on DeepSpeed's fp32 masters)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from near_ties import assert_same_nm_masks_up_to_near_ties

from models import ModelConfig
from trainer.config import OptimizerConfig, TrainerConfig
from trainer.distributed import free_port
from trainer.sparsity import SparsityConfig
from trainer.sparsity.nm import nm_mask
from trainer.worker import TrainerWorker

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
SEQ = 16


def worker(micro: int, accum: int, precision: str = "fp32", lr: float = 3e-3, decay: float = 20.0) -> TrainerWorker:
    cfg = TrainerConfig(max_steps=10, seq_len=SEQ, micro_batch_size=micro, grad_accum=accum, device="cpu", seed=0,
                        precision=precision, grad_clip=0.0)
    w = TrainerWorker(MODEL, cfg, OptimizerConfig(lr=lr, warmup_steps=0, min_lr=lr, weight_decay=0.0),
                      SparsityConfig(method="nm", n=2, m=4, sr_ste_decay=decay))
    w.setup("127.0.0.1", free_port())
    return w


def tokens(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"tokens": rng.integers(0, 256, size=(8, SEQ + 1))}


def masters(w: TrainerWorker) -> dict[str, torch.Tensor]:
    return {n: w.param_access.get(n).detach().float().clone() for n in w.sparsifier.layers}


MASTER_ATOL = 3e-5


def test_grad_accum_1_and_4_give_the_same_masters():
    a, b = worker(8, 1), worker(2, 4)
    try:
        for step in range(3):
            ma, mb = a.train_step(tokens(step)), b.train_step(tokens(step))
        for n, value in masters(a).items():
            # (Adam's first step, m/sqrt(v) = sign(g), may flip a near-zero gradient's sign under a
            # different summation order: ~1e-5 at a few entries; the decay moves pruned ones ~1e-3)
            assert torch.allclose(value, masters(b)[n], atol=MASTER_ATOL), n
            # The next masks come from these masters: where two of a group's weights are closer
            # than the masters' difference, another summation order (AVX-512, AMX) may keep the other.
            layer = a.sparsifier.layers[n]
            input_dim = a.sparsifier.pattern(layer)["input_dim"]
            assert_same_nm_masks_up_to_near_ties(layer.mask, b.sparsifier.layers[n].mask, value, 2, 4, input_dim,
                                                 tie=2 * MASTER_ATOL)
        assert ma["sparsity/pruned_to_kept_norm"] == pytest.approx(mb["sparsity/pruned_to_kept_norm"], rel=1e-6)
    finally:
        a.shutdown()
        b.shutdown()


def test_the_near_tie_check_refuses_a_mask_flip_no_tie_explains():
    w = torch.tensor([[0.5, 0.4, 0.1, 0.0], [0.30, 0.20002, 0.2, 0.1]])
    a = nm_mask(w, 2, 4)  # keeps 0.5, 0.4 and 0.30, 0.20002
    far = a.clone()
    far[1, 0], far[1, 2] = False, True  # 0.30 dropped for 0.2: no tie
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_same_nm_masks_up_to_near_ties(a, far, w, 2, 4, 1, tie=6e-5)
    near = a.clone()
    near[1, 1], near[1, 2] = False, True  # 0.20002 dropped for 0.2: within the tolerance
    assert assert_same_nm_masks_up_to_near_ties(a, near, w, 2, 4, 1, tie=6e-5) == 1


def test_bf16_pruned_masters_decay_by_lr_times_lambda():
    """With lr so small that AdamW's own first update (+-lr per weight) is small, one step
    multiplies every pruned fp32 master by 1 - lr * lambda_d = 1 - 2e-4, which bf16 could not hold."""
    w = worker(8, 1, precision="bf16", lr=1e-6, decay=200.0)
    try:
        before = masters(w)
        w.train_step(tokens(0))
        after = masters(w)
        for n, w0 in before.items():
            pruned = ~nm_mask(w0, 2, 4)
            expected = w0[pruned] * (1 - 1e-6 * 200.0)
            assert torch.allclose(after[n][pruned], expected, atol=2e-6), n  # Adam moves a weight by ~lr
            shrink = (after[n][pruned].abs().sum() / w0[pruned].abs().sum()).item()
            assert shrink == pytest.approx(1 - 2e-4, abs=2e-5), n
    finally:
        w.shutdown()
