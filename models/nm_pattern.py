"""The N:M sparsity pattern: at most N nonzeros in every group of M consecutive entries along
one dimension of a tensor. Its text form `"N:M"` and the check that a tensor follows it, shared
by the trainer's N:M sparsifier (trainer/sparsity/nm.py) and the export's sparsity.json
(models/export.py), which wrap these ValueErrors in their own error types.
"""
from __future__ import annotations

import torch


def parse_nm(text: object) -> tuple[int, int]:
    """(N, M) of the text `"N:M"`; ValueError when it is not two integers around one colon.
    The range of N and M is the caller's rule (a sparsifier needs N < M, a claim allows N = M)."""
    try:
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise ValueError(f"{text!r} is not of the form 'N:M'") from None
    return n, m


def nm_group_counts(weight: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """Nonzeros in each group of M consecutive entries along `dim` (1-D, one entry per group);
    ValueError when M does not divide that dimension."""
    w = weight.detach().movedim(dim, -1)
    if w.shape[-1] % m:
        raise ValueError(f"M={m} does not divide dimension {dim} (size {w.shape[-1]}) of a {tuple(weight.shape)} tensor")
    return (w != 0).reshape(-1, m).sum(-1)


def nm_violations(weight: torch.Tensor, n: int, m: int, dim: int) -> int:
    """Number of groups of M consecutive entries along `dim` holding more than N nonzeros."""
    return int((nm_group_counts(weight, m, dim) > n).sum())
