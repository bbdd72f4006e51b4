"""N:M masks, STE / SR-STE gradients, progressive gradient flow, against independent formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from sparsity_testlib import Run, batch, lm_loss, tiny_gpt

from trainer.sparsity import SparsityConfig, SparsityPatternError, build_sparsifier
from trainer.sparsity.nm import mdgf_beta, nm_mask, sdgf_stages


def reference_nm_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Row-major [out, in]: per row, per group of m along `in`, keep the n largest |w|
    (ties: lower index), by an explicit loop."""
    out = np.zeros(w.shape, dtype=bool)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], m):
            group = np.abs(w[r, g0:g0 + m])
            order = sorted(range(m), key=lambda i: (-group[i], i))
            for i in order[:n]:
                out[r, g0 + i] = True
    return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (1, 8), (4, 8), (1, 16), (3, 16)])
def test_nm_mask_matches_reference(n, m):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(n * 100 + m))
    expected = reference_nm_mask(w.numpy(), n, m)
    assert np.array_equal(nm_mask(w, n, m, input_dim=1).numpy(), expected)
    # Conv1D layout [in, out]: groups run along dim 0
    assert np.array_equal(nm_mask(w.t().contiguous(), n, m, input_dim=0).t().numpy(), expected)


def test_nm_mask_ties_keep_lower_index():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0]])
    assert nm_mask(w, 2, 4).tolist() == [[True, True, False, False, True, False, False, True]]
    assert nm_mask(w, 1, 4).tolist() == [[True, False, False, False, False, False, False, True]]


def _single_linear_sparsifier(cfg_kwargs, total_steps=10, seed=0):
    torch.manual_seed(seed)
    model = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(16, 6)])})
    cfg = SparsityConfig(method="nm", **cfg_kwargs)
    sp = build_sparsifier(model, cfg, total_steps)
    sp.attach()
    return model, model["blocks"][0], sp


@pytest.mark.parametrize("estimator,form,micro", [
    ("ste", "coupled", 1), ("sr_ste", "coupled", 1), ("sr_ste", "coupled", 4), ("sr_ste", "decoupled", 1)])
def test_ste_and_sr_ste_gradient_by_hand(estimator, form, micro):
    lam = 0.37  # large, so a wrong term could not hide in float noise
    model, lin, sp = _single_linear_sparsifier(
        {"n": 2, "m": 4, "estimator": estimator, "sr_ste_lambda": lam, "sr_ste_form": form})
    sp.set_step_context(lr=1e-3, peak_lr=1e-3, micro_batches=micro)
    sp.before_forward(0)
    x = torch.randn(5, 16)
    c = torch.randn(5, 6)
    y = lin(x)
    W = lin.weight.detach()
    mask = torch.tensor(reference_nm_mask(W.numpy(), 2, 4))
    assert torch.allclose(y, x @ (W * mask).t() + lin.bias, atol=1e-6)
    (y * c).sum().backward()
    grad_sparse = c.t() @ x  # dL/dW_eff for y = x W_eff^T
    # coupled SR-STE: lambda (1 - mask) W once per optimizer step, i.e. / micro-batches per backward;
    # the decoupled form leaves the gradient alone (it decays the masters after the step)
    coupled = estimator == "sr_ste" and form == "coupled"
    expected = grad_sparse + (lam / micro * (~mask) * W if coupled else 0)
    assert torch.allclose(lin.weight.grad, expected, atol=1e-5)
    assert torch.allclose(lin.bias.grad, c.sum(0), atol=1e-5)


def test_mdgf_beta_formulas():
    for t in [10, 11, 50, 500, 5010]:
        assert mdgf_beta(t, 10, 0.002, "mdgf_linear") == pytest.approx(max(0.0, 1 - 0.002 * (t - 10)))
        assert mdgf_beta(t, 10, 0.01, "mdgf_exp") == pytest.approx(math.exp(-0.01 * (t - 10)))
    assert mdgf_beta(1000, 0, 0.002, "mdgf_linear") == 0.0


def test_mdgf_forward_phases_and_eval_hard_mask():
    total, coef = 100, 0.01
    model, lin, sp = _single_linear_sparsifier(
        {"n": 1, "m": 4, "estimator": "ste", "gradient_flow": "mdgf_linear", "decay_coef": coef,
         "dense_fraction": 0.1, "fine_tune_fraction": 0.2}, total_steps=total)
    x = torch.randn(3, 16)
    W = lin.weight.detach()
    mask = torch.tensor(reference_nm_mask(W.numpy(), 1, 4)).float()
    for step, beta in [(0, None), (9, None), (10, 1.0), (30, 1 - coef * 20), (79, 1 - coef * 69), (80, 0.0), (99, 0.0)]:
        sp.before_forward(step)
        eff = W if beta is None else W * (mask + (1 - mask) * beta)
        assert torch.allclose(lin(x), x @ eff.t() + lin.bias, atol=1e-6), step
        model.eval()  # eval and publishing see the hard mask
        hard = W if beta is None else W * mask
        assert torch.allclose(lin(x), x @ hard.t() + lin.bias, atol=1e-6), step
        model.train()


def test_sdgf_stage_sequences():
    assert sdgf_stages(1, 16, "sparsify") == [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]
    assert sdgf_stages(1, 8, "sparsify") == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert sdgf_stages(2, 4, "sparsify") == [(3, 4), (2, 4)]
    assert sdgf_stages(1, 8, "densify") == [(1, 64), (1, 32), (1, 16), (1, 8)]
    assert sdgf_stages(1, 8, "fine") == [(8, 64), (4, 32), (2, 16), (1, 8)]
    assert sdgf_stages(1, 8, "custom", ["4:8", "1:8"]) == [(4, 8), (1, 8)]


def test_sdgf_stages_switch_at_equal_frames():
    total = 100  # dense 10 steps, fine-tune 10 steps: 80 sparse steps in 5 frames of 16
    model, lin, sp = _single_linear_sparsifier(
        {"n": 1, "m": 16, "gradient_flow": "sdgf", "dense_fraction": 0.1, "fine_tune_fraction": 0.1},
        total_steps=total)
    starts = [10 + int(i * 80 / 5) for i in range(5)]
    patterns = [15, 8, 4, 2, 1]
    layer = next(iter(sp.layers.values()))
    for step in range(total):
        sp.before_forward(step)
        if step < 10:
            assert layer.mask is None
            continue
        i = max(j for j, s in enumerate(starts) if step >= s)
        n = 1 if step >= 90 else patterns[i]
        assert int(layer.mask.sum()) == n * lin.weight.numel() // 16, step
        assert torch.equal(layer.mask, nm_mask(lin.weight, n, 16))


def test_mask_interval_recomputes_every_k_steps():
    model, lin, sp = _single_linear_sparsifier({"n": 2, "m": 4, "mask_interval": 3})
    seen = []
    for step in range(7):
        sp.before_forward(step)
        seen.append(next(iter(sp.layers.values())).mask)
        with torch.no_grad():
            lin.weight.copy_(torch.randn_like(lin.weight))  # any recompute would change the mask
    assert seen[0] is seen[1] is seen[2] and seen[3] is seen[4] is seen[5]
    assert seen[3] is not seen[2] and seen[6] is not seen[5]


def test_sad_counts_flipped_positions():
    model, lin, sp = _single_linear_sparsifier({"n": 1, "m": 4})
    with torch.no_grad():
        lin.weight.copy_(torch.arange(96, dtype=torch.float32).reshape(6, 16) + 1)  # keeps index 3 of each group
    sp.before_forward(0)
    with torch.no_grad():
        lin.weight[0, 0] = 1000.0  # group 0 of row 0: keeper moves from 3 to 0 (2 flips)
        lin.weight[5, 12] = 1000.0  # last group of row 5: 2 flips
    sp.before_forward(1)
    m = sp.metrics()
    assert m["sparsity/sad"] == 4 and m["sparsity/sad_normalized"] == pytest.approx(4 / 96)
    assert m["sparsity/sad_since_start"] == 4 and m["sparsity/ever_flipped"] == pytest.approx(4 / 96)
    with torch.no_grad():
        lin.weight[0, 0] = 0.0  # flips back
    sp.before_forward(2)
    m = sp.metrics()
    assert m["sparsity/sad"] == 2 and m["sparsity/sad_since_start"] == 2
    assert m["sparsity/sad_cumulative"] == 6 and m["sparsity/ever_flipped"] == pytest.approx(4 / 96)
    assert m["sparsity/density"] == pytest.approx(0.25)


@pytest.mark.parametrize("n,m,estimator", [(2, 4, "sr_ste"), (1, 8, "ste"), (1, 16, "sr_ste")])
def test_pattern_holds_after_training(n, m, estimator):
    run = Run(SparsityConfig(method="nm", n=n, m=m, estimator=estimator), total_steps=4)
    for _ in range(4):
        run.train_step()
    state = run.model.state_dict()
    published = run.sparsifier.masked_state_dict(state)
    run.sparsifier.check_pattern(published)
    for name in run.sparsifier.sparsified:
        groups = published[name].reshape(-1, m)  # Linear [out, in]: groups along in
        assert int((groups != 0).sum(1).max()) <= n
        # published = W * the mask the last forward used (recomputed from W before that step)
        assert torch.equal(published[name], state[name] * run.sparsifier.layers[name].mask)
    with pytest.raises(SparsityPatternError, match="h.0.attn.c_attn.weight"):
        run.sparsifier.check_pattern(state)  # the dense weights are not N:M
    assert set(published) == set(state)  # names unchanged
    for name in state:
        if name not in run.sparsifier.sparsified:
            assert torch.equal(published[name], state[name])


def test_attach_keeps_parameter_names_and_dense_loss_before_attach():
    model = tiny_gpt()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    tokens = batch(0)
    dense_loss = lm_loss(model, tokens)
    sp = build_sparsifier(model, SparsityConfig(method="nm"), 10)
    sp.attach()
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert sorted(sp.sparsified) == sorted(
        f"h.{i}.{mod}.weight" for i in range(2) for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    sp.before_forward(0)
    assert not torch.allclose(lm_loss(model, tokens), dense_loss)
    sp.detach()
    assert torch.allclose(lm_loss(model, tokens), dense_loss)


def test_hf_conv1d_groups_run_along_dim0():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.ModuleDict({"h": nn.ModuleList([nn.ModuleDict({"c_fc": Conv1D(6, 16)})])})  # weight [16, 6]
    conv = model["h"][0]["c_fc"]
    sp = build_sparsifier(model, SparsityConfig(method="nm", n=1, m=8, estimator="ste"), 10)
    sp.attach()
    sp.before_forward(0)
    x = torch.randn(2, 3, 16)
    W = conv.weight.detach()
    mask = torch.tensor(reference_nm_mask(W.t().numpy(), 1, 8)).t()
    assert torch.allclose(conv(x), x @ (W * mask) + conv.bias, atol=1e-6)
    assert sp.sparsified["h.0.c_fc.weight"] == {"kind": "nm", "n": 1, "m": 8, "input_dim": 0}


def test_overrides_set_per_layer_pattern():
    cfg = SparsityConfig(method="nm", n=2, m=4, overrides={"h.0.mlp.*": {"n": 1, "m": 8}})
    run = Run(cfg, total_steps=2)
    run.train_step()
    run.sparsifier.before_forward(1)  # recomputes from the updated weights
    assert run.sparsifier.sparsified["h.0.mlp.c_fc.weight"]["m"] == 8
    assert run.sparsifier.sparsified["h.1.mlp.c_fc.weight"]["m"] == 4
    w = run.model.h[0].mlp.c_fc.weight
    assert torch.equal(run.sparsifier.layers["h.0.mlp.c_fc.weight"].mask, nm_mask(w, 1, 8))


def test_forward_and_publish_before_the_first_step_are_already_nm():
    model = tiny_gpt()
    sp = build_sparsifier(model, SparsityConfig(method="nm", n=1, m=8), 10)
    sp.attach()
    published = sp.masked_state_dict(model.state_dict())
    sp.check_pattern(published)
    w = model.h[0].mlp.c_fc.weight.detach()
    x = torch.randn(2, 64)
    assert torch.allclose(model.h[0].mlp.c_fc(x), x @ (w * nm_mask(w, 1, 8)).t() + model.h[0].mlp.c_fc.bias, atol=1e-6)
    with torch.no_grad():  # weights loaded after attach: step 0 recomputes from them
        model.h[0].mlp.c_fc.weight.mul_(-2.0).add_(torch.randn_like(w))
    sp.before_forward(0)
    assert torch.equal(sp.layers["h.0.mlp.c_fc.weight"].mask, nm_mask(model.h[0].mlp.c_fc.weight, 1, 8))
    assert sp.metrics()["sparsity/sad_cumulative"] == 0
