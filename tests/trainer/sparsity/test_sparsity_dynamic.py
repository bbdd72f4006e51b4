"""SET / RigL / static and ERK against independent computations of the papers' rules."""
from __future__ import annotations

import math

import pytest
import torch
from sparsity_testlib import Run, batch, lm_loss

from trainer.sparsity import SparsityConfig, layer_densities


def reference_erk(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, float]:
    """RigL's ERK, written independently: raise eps until no layer exceeds 1, largest raw first."""
    dense = set()
    while True:
        free = [n for n in shapes if n not in dense]
        total = sum(a * b for a, b in shapes.values())
        target = density * total - sum(shapes[n][0] * shapes[n][1] for n in dense)
        eps = target / sum((shapes[n][0] + shapes[n][1]) for n in free)  # raw * numel = a + b
        worst = max(free, key=lambda n: (shapes[n][0] + shapes[n][1]) / (shapes[n][0] * shapes[n][1]))
        a, b = shapes[worst]
        if eps * (a + b) / (a * b) <= 1:
            return {n: 1.0 if n in dense else eps * (shapes[n][0] + shapes[n][1]) / (shapes[n][0] * shapes[n][1])
                    for n in shapes}
        dense.add(worst)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 0.9])
def test_erk_matches_formula_and_budget(density):
    shapes = {"h.0.a": (192, 64), "h.0.b": (64, 64), "h.0.c": (256, 64), "h.0.d": (64, 256), "h.1.tiny": (4, 8)}
    cfg = SparsityConfig(method="rigl", density=density, distribution="erk")
    got = layer_densities(cfg, shapes)
    expected = reference_erk(shapes, density)
    total = sum(a * b for a, b in shapes.values())
    assert sum(got[n] * a * b for n, (a, b) in shapes.items()) == pytest.approx(density * total, rel=1e-9)
    for n in shapes:
        assert got[n] == pytest.approx(expected[n], rel=1e-9)
        assert 0 < got[n] <= 1
    if density >= 0.5:
        assert got["h.1.tiny"] == 1.0  # (4 + 8) / 32 is the largest raw density: made dense first


def test_uniform_and_override_densities():
    shapes = {"h.0.a": (64, 64), "h.0.b": (256, 64)}
    cfg = SparsityConfig(method="set", density=0.2, distribution="uniform", overrides={"h.0.b": {"density": 0.5}})
    assert layer_densities(cfg, shapes) == {"h.0.a": 0.2, "h.0.b": 0.5}


def _dense_grads(run: Run, step: int) -> dict[str, torch.Tensor]:
    """dL/d(W * mask) for the step's batch, computed by a separate plain forward (no sparsifier
    Function): the masked weights are put in as leaf tensors."""
    model = run.model
    saved = {}
    leaves = {}
    for name, layer in run.sparsifier.layers.items():
        module = layer.module
        leaf = (module.weight.detach() * layer.mask).requires_grad_(True)
        leaves[name] = leaf
        saved[name] = module.forward
        module.forward = (lambda mod, w: (lambda x: torch.nn.functional.linear(x, w, mod.bias)))(module, leaf)
    loss = lm_loss(model, batch(step))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    for name, layer in run.sparsifier.layers.items():
        layer.module.forward = saved[name]
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_drop_grow_follow_cosine_schedule(method):
    total, interval, alpha = 40, 5, 0.3
    cfg = SparsityConfig(method=method, density=0.2, distribution="erk", update_interval=interval,
                         drop_fraction=alpha, end_fraction=0.75, seed=3)
    run = Run(cfg, total_steps=total)
    end = int(0.75 * total)
    expected_updates = [t for t in range(total) if 0 < t < end and t % interval == 0]
    updates = []
    active = {n: int(l.mask.sum()) for n, l in run.sparsifier.layers.items()}
    for step in range(total):
        sp = run.sparsifier
        old = run.masks()
        grads = _dense_grads(run, step) if method == "rigl" else None
        sp.before_forward(step)
        loss = lm_loss(run.model, batch(step))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, layer in sp.layers.items():  # inactive weights get no gradient
            assert torch.count_nonzero(layer.module.weight.grad[~layer.mask]) == 0
        run.optimizer.step()
        after_step = {n: l.module.weight.detach().clone() for n, l in sp.layers.items()}
        sp.after_optimizer_step(step, run.params)
        run.step += 1
        new = run.masks()
        changed = any(not torch.equal(old[n], new[n]) for n in new)
        if step not in expected_updates:
            assert not changed, step
            continue
        updates.append(step)
        f = alpha / 2 * (1 + math.cos(math.pi * step / end))
        for name, layer in sp.layers.items():
            n_active = active[name]
            k = int(f * n_active)
            assert int(new[name].sum()) == n_active  # constant budget
            w = after_step[name]
            # drop: the k smallest |w| among the active ones go; the rest stay
            order = torch.argsort(torch.where(old[name], w.abs(), torch.tensor(float("inf"))).flatten())
            kept = torch.zeros(w.numel(), dtype=torch.bool)
            kept[order[k:n_active]] = True
            kept = kept.reshape(w.shape)
            assert torch.equal(new[name] & kept, kept), name
            grown = new[name] & ~kept
            assert int(grown.sum()) == k
            if method == "rigl":  # grow: the k largest |dense grad| among the not-kept positions
                g = grads[name].abs()
                threshold = g[grown].min()
                assert bool((g[~kept & ~new[name]] <= threshold).all()), name
            newly = new[name] & ~old[name]
            weight = layer.module.weight.detach()
            assert torch.count_nonzero(weight[newly]) == 0  # grown weights start at 0
            state = run.optimizer.state[layer.module.weight]
            assert torch.count_nonzero(state["exp_avg"][newly]) == 0
            assert torch.count_nonzero(state["exp_avg_sq"][newly]) == 0
            assert torch.count_nonzero(weight[~new[name]]) == 0  # inactive masters stay 0
    assert updates == expected_updates
    published = run.sparsifier.masked_state_dict(run.model.state_dict())
    run.sparsifier.check_pattern(published)
    run.sparsifier.check_pattern(run.model.state_dict())  # masters themselves are sparse


@pytest.mark.parametrize("init", ["random", "magnitude"])
def test_static_mask_never_changes(init):
    cfg = SparsityConfig(method="static", density=0.1, distribution="uniform", init=init)
    run = Run(cfg, total_steps=6)
    if init == "magnitude":
        for layer in run.sparsifier.layers.values():
            w = layer.module.weight.detach().abs()
            k = round(0.1 * w.numel())
            threshold = torch.topk(w.flatten(), k).values.min()
            assert bool((w[layer.mask] >= threshold).all()) and int(layer.mask.sum()) == k
    first = run.masks()
    for _ in range(6):
        run.train_step()
    assert all(torch.equal(first[n], m) for n, m in run.masks().items())
    run.sparsifier.check_pattern(run.model.state_dict())
    m = run.sparsifier.metrics()
    assert m["sparsity/density"] == pytest.approx(0.1, abs=1e-3) and m["sparsity/sad_cumulative"] == 0


def test_seeded_masks_identical_across_instances():
    """What keeps data-parallel ranks identical: same seed, same masks and regrowth."""
    cfg = SparsityConfig(method="set", density=0.3, update_interval=2, seed=11)
    a, b = Run(cfg, total_steps=8), Run(cfg, total_steps=8)
    for _ in range(8):
        a.train_step(), b.train_step()
    assert all(torch.equal(a.masks()[n], b.masks()[n]) for n in a.masks())
