"""N:M in the backward pass (sparsity.backward): transposable masks against brute force, Bi-Mask's
backward mask against a loop over groups, gradients against a hand-built masked matmul."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from sparsity_testlib import Run
from trainer.sparsity import SparsityConfig, SparsityConfigError, SparsityPatternError, build_sparsifier, validate_sparsity_config
from trainer.sparsity.nm import nm_mask
from trainer.sparsity.nm_backward import (
    best_permutation, bidirectional_mask, transposable_mask, transposable_patterns,
)


@pytest.mark.parametrize("n, m, count", [(1, 3, 6), (1, 4, 24), (2, 4, 90), (2, 5, 2040), (3, 5, 2040)])
def test_transposable_pattern_counts(n, m, count):
    # OEIS A008300 (0/1 matrices with n ones per row and column): 3! = 6, 4! = 24, 90, 2040
    patterns = transposable_patterns(n, m)
    assert len(patterns) == count
    assert (patterns.sum(dim=1) == n).all() and (patterns.sum(dim=2) == n).all()
    assert len({tuple(p.flatten().tolist()) for p in patterns}) == count


def _brute_force_best(block: torch.Tensor, n: int) -> float:
    """The largest kept sum |w| over every 0/1 mask of the block with n per row and column."""
    m = block.shape[0]
    best = -1.0
    a = block.abs().double()
    for bits in itertools.product((0, 1), repeat=m * m):
        mask = torch.tensor(bits, dtype=torch.float64).reshape(m, m)
        if (mask.sum(0) == n).all() and (mask.sum(1) == n).all():
            best = max(best, float((a * mask).sum()))
    return best


def test_exact_transposable_mask_is_the_brute_force_optimum():
    torch.manual_seed(0)
    w = torch.randn(8, 12)
    mask = transposable_mask(w, 2, 4, algorithm="exact")
    for i in range(0, 8, 4):
        for j in range(0, 12, 4):
            block, kept = w[i:i + 4, j:j + 4], mask[i:i + 4, j:j + 4]
            assert (kept.sum(0) == 2).all() and (kept.sum(1) == 2).all()
            got = float((block.abs().double() * kept).sum())
            # float32 scores pick the pattern; sums of 8 values of ~1 agree to ~1e-6 relative
            assert got == pytest.approx(_brute_force_best(block, 2), rel=1e-5)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (3, 8)])
def test_greedy_transposable_mask_is_valid_and_within_half_of_the_optimum(n, m):
    torch.manual_seed(1)
    w = torch.randn(2 * m, 3 * m)
    mask = transposable_mask(w, n, m, algorithm="greedy")
    blocks = mask.reshape(2, m, 3, m).permute(0, 2, 1, 3).reshape(-1, m, m)
    assert (blocks.sum(1) <= n).all() and (blocks.sum(2) <= n).all()
    if m <= 4:  # greedy on a b-matching keeps at least half of the optimum's weight
        exact = transposable_mask(w, n, m, algorithm="exact")
        wb = w.abs().reshape(2, m, 3, m).permute(0, 2, 1, 3).reshape(-1, m * m)
        g = (wb * blocks.reshape(-1, m * m)).sum(1)
        e = (wb * exact.reshape(2, m, 3, m).permute(0, 2, 1, 3).reshape(-1, m * m)).sum(1)
        assert (g >= 0.5 * e - 1e-6).all() and (g <= e + 1e-5).all()


def _reference_backward_mask(w, fmask, n, m, perm):
    """Loop: for every input column, walk the output rows in `perm` order in groups of m, keep
    the n largest |w . M_f| of each group (lower position on ties), then AND M_f."""
    out = torch.zeros_like(fmask)
    kept = (w * fmask).abs()
    for col in range(w.shape[1]):
        for g in range(0, w.shape[0], m):
            rows = perm[g:g + m].tolist()
            values = [(float(kept[r, col]), -k) for k, r in enumerate(rows)]
            top = sorted(range(m), key=lambda k: values[k], reverse=True)[:n]
            for k in top:
                out[rows[k], col] = True
    return out & fmask


@pytest.mark.parametrize("permuted", [False, True])
def test_bidirectional_mask_matches_a_loop_over_groups(permuted):
    torch.manual_seed(2)
    w = torch.randn(16, 8)  # Linear [out, in]
    fmask = nm_mask(w, 2, 4, input_dim=1)
    perm = torch.randperm(16) if permuted else torch.arange(16)
    got = bidirectional_mask(w, fmask, 2, 4, output_dim=0, permutation=perm if permuted else None)
    assert torch.equal(got, _reference_backward_mask(w, fmask, 2, 4, perm))
    # N:M along the output dim in permuted order, inside the forward mask
    assert (got[perm].reshape(4, 4, 8).sum(1) <= 2).all() and not (got & ~fmask).any()


def test_best_permutation_keeps_at_least_the_identitys_count():
    torch.manual_seed(3)
    w = torch.randn(32, 16)
    fmask = nm_mask(w, 2, 4, input_dim=1)
    identity = int(bidirectional_mask(w, fmask, 2, 4, 0).sum())
    perm = best_permutation(w, fmask, 2, 4, 0, 10, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(32))
    assert int(bidirectional_mask(w, fmask, 2, 4, 0, perm).sum()) >= identity


class _Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([layer])

    def forward(self, x):
        return self.blocks[0](x)


def _conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D
    return Conv1D(nf, nx)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_bidirectional_gradients_match_a_hand_built_masked_matmul(kind):
    torch.manual_seed(4)
    layer = nn.Linear(8, 16) if kind == "linear" else _conv1d(8, 16)
    with torch.no_grad():
        layer.bias.normal_()
    model = _Net(layer)
    cfg = SparsityConfig(method="nm", n=2, m=4, estimator="ste", backward="bidirectional")
    sparsifier = build_sparsifier(model, cfg, total_steps=4)
    sparsifier.attach()
    sparsifier.before_forward(0)
    sl = next(iter(sparsifier.layers.values()))
    # [out, in] views of the weight and both masks, whatever the storage layout
    as_oi = (lambda t: t) if kind == "linear" else (lambda t: t.t())
    w, fmask, bmask = as_oi(layer.weight.detach()), as_oi(sl.mask), as_oi(sl.backward_mask)
    assert bmask.sum() < fmask.sum()  # the check below distinguishes M_b from M_f

    x = torch.randn(3, 5, 8, dtype=torch.float64).float().requires_grad_()
    g = torch.randn(3, 5, 16)
    y = model(x)
    (y * g).sum().backward()

    # reference in float64: y = x (W M_f)^T + b, dx = g (W M_b), dW = g^T x (STE), db = sum g
    xd, gd, wd = x.detach().double().reshape(-1, 8), g.double().reshape(-1, 16), w.double()
    y_ref = xd @ (wd * fmask).t() + layer.bias.detach().double()
    dx_ref = gd @ (wd * bmask)
    dw_ref = gd.t() @ xd
    # fp32 products of 8 (y) or 16 (dx) terms and sums of 15 (dW): errors ~1e-6 of values ~1-10
    assert torch.allclose(y.detach().double().reshape(-1, 16), y_ref, atol=1e-4)
    assert torch.allclose(x.grad.double().reshape(-1, 8), dx_ref, atol=1e-4)
    assert torch.allclose(as_oi(layer.weight.grad).double(), dw_ref, atol=1e-4)
    assert torch.allclose(layer.bias.grad.double(), gd.sum(0), atol=1e-4)
    # and the input gradient is not the exact one (through W M_f)
    assert not torch.allclose(x.grad.double().reshape(-1, 8), gd @ (wd * fmask), atol=1e-3)


def test_transposable_training_keeps_n_m_along_both_dims_and_exports_it():
    run = Run(SparsityConfig(method="nm", n=2, m=4, backward="transposable"), total_steps=4)
    for _ in range(3):
        run.train_step()
    sp = run.sparsifier
    state = sp.masked_state_dict(run.model.state_dict())
    sp.check_pattern(state)  # along both dims
    for name, layer in sp.layers.items():
        w = state[name]
        for dim in (0, 1):
            counts = (w.movedim(dim, -1).reshape(-1, 4) != 0).sum(1)
            assert (counts <= 2).all()
        # the exact search keeps exactly 2 per row and column of every block
        assert int(layer.mask.sum()) * 2 == layer.numel
        assert sp.pattern(layer)["transposable"] is True
    metrics = sp.metrics()
    assert metrics["sparsity/backward_density"] == metrics["sparsity/density"] == 0.5
    bad = dict(state)
    name = next(iter(sp.layers))
    bad[name] = bad[name].clone()
    bad[name][0:4, 0:4] = 0.0
    bad[name][0:4, 0:2] = 1.0  # 2 per row (input dim fine), 4 in columns 0 and 1 (output dim not)
    with pytest.raises(SparsityPatternError, match="2 of .* along the output dim"):
        sp.check_pattern(bad)


def test_bidirectional_training_state_round_trip_and_backward_density():
    cfg = SparsityConfig(method="nm", n=2, m=4, backward="bidirectional", backward_permutation_interval=2)
    run = Run(cfg, total_steps=6)
    for _ in range(3):
        run.train_step()
    sp = run.sparsifier
    masks_b = {n: layer.backward_mask.clone() for n, layer in sp.layers.items()}
    total = sum(layer.numel for layer in sp.layers.values())
    expected = sum(int(m.sum()) for m in masks_b.values()) / total
    assert sp.metrics()["sparsity/backward_density"] == pytest.approx(expected)
    assert expected < 0.5
    sp.check_pattern(sp.masked_state_dict(run.model.state_dict()))  # forward: N:M along the input dim

    other = Run(cfg, total_steps=6, seed=1)
    other.model.load_state_dict(run.model.state_dict())
    other.sparsifier.load_state_dict(sp.state_dict())
    for name, layer in other.sparsifier.layers.items():
        assert torch.equal(layer.backward_mask, masks_b[name])
        assert layer.extra["backward_perm"] == sp.layers[name].extra["backward_perm"]


@pytest.mark.parametrize("cfg, shapes, message", [
    (SparsityConfig(method="rigl", backward="transposable"), {"h.0.fc": (8, 8)}, "method=nm only"),
    (SparsityConfig(method="nm", backward="transposable"), {"h.0.fc": (6, 8)}, "output dimension 6"),
    (SparsityConfig(method="nm", backward="bidirectional"), {"h.0.fc": (6, 8)}, "output dimension 6"),
    (SparsityConfig(method="nm", backward="sideways"), {"h.0.fc": (8, 8)}, "sparsity.backward='sideways'"),
    (SparsityConfig(method="nm", backward="transposable", gradient_flow="sdgf"), {"h.0.fc": (8, 8)},
     "gradient_flow"),
    (SparsityConfig(method="nm", backward="bidirectional", backward_permutations=-1), {"h.0.fc": (8, 8)},
     "backward_permutations"),
])
def test_bad_backward_configs_are_named_errors(cfg, shapes, message):
    with pytest.raises(SparsityConfigError, match=message):
        validate_sparsity_config(cfg, shapes)
