"""The driver's pure helpers around the trainer group: `TrainBatch.shard` (trainer/algos/batch.py)
splits a step's batch into rank shares, `merge_metrics` (launch/trainer_group.py) folds the ranks'
metrics into one dict."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from launch.trainer_group import merge_metrics
from trainer.algos.batch import TrainBatch


def _batch(rows: int, width: int = 3) -> TrainBatch:
    ids = torch.arange(rows * width).reshape(rows, width)
    return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones(rows, width),
                      rewards=torch.arange(rows) * 10.0)


def test_shard_gives_each_rank_its_consecutive_block_of_every_field():
    shares = _batch(6).shard(3)
    assert len(shares) == 3
    assert torch.equal(shares[0].input_ids, torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert torch.equal(shares[1].input_ids, torch.tensor([[6, 7, 8], [9, 10, 11]]))
    assert torch.equal(shares[2].input_ids, torch.tensor([[12, 13, 14], [15, 16, 17]]))
    assert [s.rewards.tolist() for s in shares] == [[0.0, 10.0], [20.0, 30.0], [40.0, 50.0]]
    assert all(s.advantages is None and s.old_logprobs is None for s in shares)  # unset fields stay unset


def test_shard_shares_concatenate_back_to_the_batch():
    batch = _batch(8, 5)
    shares = batch.shard(4)
    assert [s.rows for s in shares] == [2, 2, 2, 2]
    for key, value in batch.tensors().items():
        assert torch.equal(torch.cat([s.tensors()[key] for s in shares]), value)


def test_shard_for_one_rank_is_the_whole_batch():
    batch = _batch(5)
    (only,) = batch.shard(1)
    assert torch.equal(only.input_ids, batch.input_ids)


@pytest.mark.parametrize("rows, world", [(7, 2), (3, 4)])
def test_shard_refuses_rows_that_do_not_divide_among_the_ranks(rows, world):
    with pytest.raises(ValueError, match=f"{rows} rows does not split into {world}"):
        _batch(rows).shard(world)


def test_merge_metrics_adds_sums_takes_maxima_and_averages_the_rest():
    merged = merge_metrics([
        {"sum/tokens": 100.0, "loss": 2.0, "ratio_max": 1.5},
        {"sum/tokens": 60.0, "loss": 3.0, "ratio_max": 4.0},
        {"sum/tokens": 40.0, "loss": 4.0, "ratio_max": 0.5},
    ])
    assert merged == {"sum/tokens": 200.0, "loss": 3.0, "ratio_max": 4.0}


def test_merge_metrics_averages_a_key_over_the_ranks_that_reported_it_only():
    merged = merge_metrics([{"loss": 1.0, "mismatch": 0.25}, {"loss": 3.0}, {"loss": 5.0, "mismatch": 0.75}])
    assert merged["loss"] == pytest.approx(3.0)
    assert merged["mismatch"] == pytest.approx(0.5)  # (0.25 + 0.75) / 2, not / 3


def test_merge_metrics_returns_plain_floats_and_nothing_for_no_ranks():
    merged = merge_metrics([{"sum/rows": torch.tensor(3)}, {"sum/rows": np.int64(4)}])
    assert merged == {"sum/rows": 7.0} and type(merged["sum/rows"]) is float
    assert merge_metrics([]) == {}
