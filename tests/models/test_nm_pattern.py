"""models/nm_pattern.py: the 'N:M' text form and the per-group nonzero count behind both the
trainer's N:M check and the export's sparsity.json check."""
from __future__ import annotations

import pytest
import torch

from models.nm_pattern import nm_group_counts, nm_violations, parse_nm


def test_parse_nm_reads_two_integers_and_leaves_their_range_to_the_caller():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm("4:4") == (4, 4)
    assert parse_nm(" 1:16") == (1, 16)
    for bad in ("2-4", "2:4:8", "a:4", "", "2:"):
        with pytest.raises(ValueError, match="is not of the form 'N:M'"):
            parse_nm(bad)


def test_groups_run_along_the_given_dim():
    w = torch.tensor([[1.0, 0.0, 2.0, 3.0],
                      [0.0, 0.0, 0.0, 4.0]])
    assert nm_group_counts(w, 4, 1).tolist() == [3, 1]  # one group per row
    assert nm_group_counts(w, 2, 1).tolist() == [1, 2, 0, 1]
    assert nm_group_counts(w, 2, 0).tolist() == [1, 0, 1, 2]  # one group per column
    assert nm_violations(w, 2, 4, 1) == 1  # row 0 holds 3 > 2
    assert nm_violations(w, 1, 2, 0) == 1  # column 3 holds 2 > 1
    assert nm_violations(w, 3, 4, 1) == 0


def test_m_must_divide_the_dim():
    with pytest.raises(ValueError, match=r"M=3 does not divide dimension 1 \(size 4\)"):
        nm_group_counts(torch.ones(2, 4), 3, 1)
