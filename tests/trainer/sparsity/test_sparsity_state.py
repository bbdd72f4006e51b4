"""Save, kill, resume: the resumed run reproduces the uninterrupted run's masks and losses."""
from __future__ import annotations

import io

import pytest
import torch
from sparsity_testlib import Run

from trainer.sparsity import SparsityConfig, SparsityStateError

CASES = {
    "nm_sr_ste_interval3": SparsityConfig(method="nm", n=2, m=4, mask_interval=3),
    "nm_mdgf_exp": SparsityConfig(method="nm", n=1, m=8, gradient_flow="mdgf_exp", decay_coef=0.1,
                                  dense_fraction=0.1, fine_tune_fraction=0.2),
    "nm_sdgf": SparsityConfig(method="nm", n=1, m=8, gradient_flow="sdgf"),
    "rigl": SparsityConfig(method="rigl", density=0.2, update_interval=2),
    "set": SparsityConfig(method="set", density=0.2, update_interval=2),
    "magnitude": SparsityConfig(method="magnitude", density=0.3, prune_interval=2),
}


def _save(run: Run) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "sparsity": run.sparsifier.state_dict(), "step": run.step}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_resume_reproduces_masks_and_losses(case):
    cfg, total, cut = CASES[case], 12, 5
    full = Run(cfg, total)
    full_losses, full_masks = [], []
    for _ in range(total):
        full_losses.append(full.train_step())
        full_masks.append(full.masks())

    first = Run(cfg, total)
    for _ in range(cut):
        first.train_step()
    blob = _save(first)
    del first  # "kill"

    resumed = Run(cfg, total, seed=123)  # different init: everything must come from the checkpoint
    ckpt = torch.load(io.BytesIO(blob), weights_only=False)
    resumed.model.load_state_dict(ckpt["model"])
    resumed.optimizer.load_state_dict(ckpt["optimizer"])
    resumed.sparsifier.load_state_dict(ckpt["sparsity"])
    resumed.step = ckpt["step"]
    for step in range(cut, total):
        loss = resumed.train_step()
        assert loss == pytest.approx(full_losses[step], abs=1e-6), step
        masks = resumed.masks()
        for n in masks:
            assert (masks[n] is None and full_masks[step][n] is None) or torch.equal(masks[n], full_masks[step][n]), step
    assert resumed.sparsifier.metrics() == pytest.approx(full.sparsifier.metrics())


def test_state_from_another_method_is_rejected():
    nm = Run(SparsityConfig(method="nm"), 4)
    rigl = Run(SparsityConfig(method="rigl"), 4)
    with pytest.raises(SparsityStateError, match="'nm'"):
        rigl.sparsifier.load_state_dict(nm.sparsifier.state_dict())
