"""SCL (learned masks): the mask gradient, its per-feature normalisation and the update against
hand computations; the controller reaching the density; freezing; state; bad configs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsity_testlib import Run
from trainer.sparsity import (
    SparsityConfig, SparsityConfigError, SparsityStateError, TorchParamAccess, build_sparsifier,
    validate_sparsity_config,
)
from trainer.sparsity.scl import cubic_target, normalise_per_feature


def test_normalise_per_feature_divides_each_output_row_by_its_rms():
    torch.manual_seed(0)
    g = torch.randn(5, 7, dtype=torch.float64)
    g[2] = 0.0
    got = normalise_per_feature(g, input_dim=1)
    for i in range(5):
        rms = (sum(float(v) ** 2 for v in g[i]) / 7) ** 0.5
        expected = torch.zeros(7, dtype=torch.float64) if rms == 0 else g[i] / rms
        assert torch.allclose(got[i], expected, rtol=1e-12, atol=0)
    # Conv1D layout [in, out]: features are columns
    assert torch.allclose(normalise_per_feature(g.t(), input_dim=0), got.t())


def test_cubic_target_schedule():
    assert cubic_target(0, 0.2, 100) == 1.0
    assert cubic_target(50, 0.2, 100) == pytest.approx(0.2 + 0.8 * 0.5 ** 3)
    assert cubic_target(100, 0.2, 100) == cubic_target(150, 0.2, 100) == 0.2


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 4)])

    def forward(self, x):
        return self.blocks[0](x)


def test_one_scl_step_by_hand():
    torch.manual_seed(1)
    model = _Net()
    cfg = SparsityConfig(method="scl", density=0.5, end_fraction=0.5, fine_tune_fraction=0.1,
                         scl_mask_lr=0.3, scl_mask_init=0.2, scl_controller_gain=10.0)
    sp = build_sparsifier(model, cfg, total_steps=10)
    sp.attach()
    layer = sp.layers["blocks.0.weight"]
    # start one mask off so W_eff differs from W
    sp.scores[layer.name][0, 0] = -0.2
    layer.mask = sp.scores[layer.name] > 0
    w = model.blocks[0].weight.detach().clone()
    mask = layer.mask.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: only the masks move
    sp.set_step_context(lr=0.0, peak_lr=0.0, micro_batches=1)
    sp.before_forward(0)
    x = torch.randn(3, 6)
    g = torch.randn(3, 4)
    (model(x) * g).sum().backward()

    g_eff = (g.double().t() @ x.double())  # dL/dW_eff, [out, in]
    assert torch.allclose(model.blocks[0].weight.grad.double(), g_eff * mask, atol=1e-5)  # dL/dW = g * M
    mask_grad = g_eff * w.double()  # dL/dM = g * W, for every mask variable
    assert torch.allclose(layer.mask_grad.double(), mask_grad, atol=1e-5)

    optimizer.step()
    sp.after_optimizer_step(0, TorchParamAccess(model, optimizer))
    density = float(mask.double().mean())
    lam = 10.0 * (density - cubic_target(1, 0.5, 5))
    rms = mask_grad.pow(2).mean(dim=1, keepdim=True).sqrt()
    expected = torch.where(mask, 0.2, -0.2).double() - 0.3 * (mask_grad / rms + lam)
    assert sp.coefficient == pytest.approx(lam)
    assert torch.allclose(sp.scores[layer.name].double(), expected, atol=1e-5)
    assert torch.equal(layer.mask, sp.scores[layer.name] > 0)


def _scl_run(total_steps: int = 40, **overrides) -> Run:
    cfg = SparsityConfig(method="scl", density=0.3, end_fraction=0.5, fine_tune_fraction=0.2, **overrides)
    return Run(cfg, total_steps=total_steps, lr=3e-3)


def test_controller_reaches_the_density_and_masks_freeze_for_the_fine_tune_tail():
    run = _scl_run()
    sp = run.sparsifier
    for _ in range(32):  # the masks freeze at step 40 - 8 = 32
        run.train_step()
    assert sp.metrics()["sparsity/density"] == pytest.approx(0.3, abs=0.02)
    frozen = run.masks()
    for _ in range(8):
        run.train_step()
    assert all(torch.equal(frozen[n], m) for n, m in run.masks().items())
    assert sp.metrics()["sparsity/masks_learning"] == 0.0
    state = sp.masked_state_dict(run.model.state_dict())
    sp.check_pattern(state)
    for name, layer in sp.layers.items():
        assert int(torch.count_nonzero(state[name])) <= int(layer.mask.sum())
        assert sp.pattern(layer)["density"] == pytest.approx(float(layer.mask.float().mean()))

    other = _scl_run(seed=0)
    other.sparsifier.load_state_dict(sp.state_dict())
    assert other.sparsifier.coefficient == sp.coefficient
    for name in sp.layers:
        assert torch.equal(other.sparsifier.scores[name], sp.scores[name])
        assert torch.equal(other.sparsifier.layers[name].mask, sp.layers[name].mask)
    rigl = Run(SparsityConfig(method="rigl", density=0.3), total_steps=40)
    with pytest.raises(SparsityStateError, match="'scl'"):
        rigl.sparsifier.load_state_dict(sp.state_dict())


def test_fixed_coefficient_and_rl_freeze():
    run = _scl_run(scl_lambda=0.5)
    for _ in range(2):
        run.train_step()
    assert run.sparsifier.coefficient == 0.5
    run.sparsifier.on_rl_start()
    before = {n: s.clone() for n, s in run.sparsifier.scores.items()}
    run.train_step()
    assert all(torch.equal(before[n], s) for n, s in run.sparsifier.scores.items())

    learning = _scl_run(scl_freeze_in_rl=False)
    learning.train_step()
    learning.sparsifier.on_rl_start()
    before = {n: s.clone() for n, s in learning.sparsifier.scores.items()}
    learning.train_step()
    assert any(not torch.equal(before[n], s) for n, s in learning.sparsifier.scores.items())


@pytest.mark.parametrize("overrides, message", [
    ({"end_fraction": 0.95, "fine_tune_fraction": 0.1}, "cannot be reached"),
    ({"density": 1.0}, "below 1"),
    ({"scl_lambda": -1.0}, "scl_lambda"),
    ({"scl_mask_lr": 0.0}, "scl_mask_lr"),
    ({"overrides": {"h.0.*": {"density": 0.5}}}, "learns each layer's density"),
])
def test_bad_scl_configs_are_named_errors(overrides, message):
    cfg = SparsityConfig(method="scl", density=0.2, end_fraction=0.5, fine_tune_fraction=0.1)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(SparsityConfigError, match=message):
        validate_sparsity_config(cfg, {"h.0.fc": (8, 8)})
