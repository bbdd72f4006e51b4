"""Gradual magnitude pruning (Zhu & Gupta 2017) against the cubic schedule."""
from __future__ import annotations

import pytest
import torch
from sparsity_testlib import Run, batch, lm_loss

from trainer.sparsity import SparsityConfig
from trainer.sparsity.magnitude import gmp_sparsity


def test_cubic_schedule_formula():
    s_i, s_f, t0, n, dt = 0.1, 0.9, 20, 5, 10
    for t in range(0, 100):
        if t < t0:
            expected = s_i
        elif t > t0 + n * dt:
            expected = s_f
        else:
            expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert gmp_sparsity(t, s_i, s_f, t0, n, dt) == pytest.approx(expected)


def test_pruning_follows_schedule_and_never_regrows():
    total = 40  # t0 = 4, end = 30, dt = 5: n = round(26 / 5) = 5 intervals, prune at 4, 9, ..., 29
    cfg = SparsityConfig(method="magnitude", density=0.2, distribution="uniform", prune_interval=5,
                         prune_start_fraction=0.1, prune_end_fraction=0.75, initial_sparsity=0.0)
    run = Run(cfg, total_steps=total)
    prune_steps = [4 + 5 * i for i in range(6)]
    previous = None
    for step in range(total):
        run.train_step()
        layer = run.sparsifier.layers["h.0.mlp.c_fc.weight"]
        if step < 4:
            assert layer.mask is None
            continue
        if step in prune_steps:
            s = 0.8 + (0.0 - 0.8) * (1 - (step - 4) / 25) ** 3
            assert int(layer.mask.sum()) == layer.numel - round(s * layer.numel), step
        if previous is not None:
            assert not bool((layer.mask & ~previous).any())  # pruned weights never come back
            if step not in prune_steps:
                assert torch.equal(layer.mask, previous)
        previous = layer.mask.clone()
        assert torch.count_nonzero(layer.module.weight.detach()[~layer.mask]) == 0
    for layer in run.sparsifier.layers.values():
        assert int(layer.mask.sum()) == round(0.2 * layer.numel)
    run.sparsifier.check_pattern(run.model.state_dict())
    assert run.sparsifier.metrics()["sparsity/density"] == pytest.approx(0.2, abs=1e-3)


def test_prunes_smallest_magnitudes():
    cfg = SparsityConfig(method="magnitude", density=0.5, distribution="uniform", prune_interval=1,
                         prune_start_fraction=0.0, prune_end_fraction=0.5)
    run = Run(cfg, total_steps=2)  # t0 = 0, n = 1 interval: prune to s_i = 0 at step 0, to 0.5 at 1
    run.train_step()
    sp = run.sparsifier
    sp.before_forward(1)
    loss = lm_loss(run.model, batch(1))
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    magnitudes = {n: l.module.weight.detach().abs().clone() for n, l in sp.layers.items()}
    sp.after_optimizer_step(1, run.params)
    for name, layer in sp.layers.items():
        k = layer.numel // 2
        threshold = torch.topk(magnitudes[name].flatten(), k).values.min()
        assert int(layer.mask.sum()) == k
        assert bool((magnitudes[name][layer.mask] >= threshold).all())
        assert bool((magnitudes[name][~layer.mask] <= threshold).all())
