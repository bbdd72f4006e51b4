"""Comparing N:M masks chosen by two computations whose float32 rounding may differ (another
summation order: a batch split, data-parallel ranks, AVX-512 / AMX): they may disagree only where
the choice was a near-tie."""
from __future__ import annotations

import torch


def assert_same_nm_masks_up_to_near_ties(mask_a: torch.Tensor, mask_b: torch.Tensor, weight_a: torch.Tensor,
                                         n: int, m: int, input_dim: int, tie: float) -> int:
    """The two N:M masks agree except in groups where the choice was a near-tie in `weight_a`:
    every weight kept by one mask and dropped by the other lies within `tie` of that group's
    boundary (the n-th largest |w|). Two runs whose masters differ by <= d can order two weights
    differently only when they are within 2 * d of each other. Returns the number of groups that
    differ."""
    ga, gb = (x.movedim(input_dim, -1).reshape(-1, m) for x in (mask_a, mask_b))
    w = weight_a.abs().movedim(input_dim, -1).reshape(-1, m)
    differ = (ga != gb).any(dim=1)
    for g in differ.nonzero().flatten().tolist():
        boundary = w[g].sort(descending=True).values[n - 1]
        swapped = w[g][ga[g] != gb[g]]
        assert ((swapped - boundary).abs() <= tie).all(), (
            f"group {g}: masks differ at |w| {swapped.tolist()}, boundary {boundary.item()}: not a near-tie")
    return int(differ.sum())
