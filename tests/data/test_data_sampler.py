"""data/sampler.py: deterministic order per seed, exact resume, eval windows."""
from __future__ import annotations

import numpy as np
import pytest

from data import DataError, WindowSampler, eval_windows

TOKENS = np.arange(1000, dtype=np.uint16)  # window w starts at token w * 10 for window 10


def starts(batch: np.ndarray) -> list[int]:
    return batch[:, 0].tolist()


def test_windows_are_consecutive_tokens_and_each_epoch_visits_all_once():
    s = WindowSampler(TOKENS, 10, seed=3)
    seen = []
    for _ in range(25):  # 100 windows, batches of 4: exactly one epoch
        b = s.next_batch(4)
        assert b.dtype == np.int64 and b.shape == (4, 10)
        np.testing.assert_array_equal(b - b[:, :1], np.tile(np.arange(10), (4, 1)))
        seen += starts(b)
    assert sorted(seen) == list(range(0, 1000, 10))
    assert s.epoch == 1 and s.index == 0
    # The order is the seeded permutation, not the file order.
    assert seen != sorted(seen)
    expected = (np.random.default_rng([3, 0]).permutation(100) * 10).tolist()
    assert seen == expected


def test_same_seed_same_order_other_seed_other_order():
    a = [starts(WindowSampler(TOKENS, 10, seed=0).next_batch(8))]
    b = [starts(WindowSampler(TOKENS, 10, seed=0).next_batch(8))]
    c = [starts(WindowSampler(TOKENS, 10, seed=1).next_batch(8))]
    assert a == b and a != c


def test_resume_continues_exactly_across_an_epoch_boundary():
    ref = WindowSampler(TOKENS, 10, seed=5)
    first = [ref.next_batch(7) for _ in range(12)]  # 84 windows
    state = ref.state_dict()
    rest = [ref.next_batch(7) for _ in range(5)]  # crosses into epoch 1
    resumed = WindowSampler(TOKENS, 10, seed=5)
    resumed.load_state_dict(dict(state))
    for want in rest:
        np.testing.assert_array_equal(resumed.next_batch(7), want)
    assert first  # used


def test_resume_refuses_a_position_from_other_data():
    state = WindowSampler(TOKENS, 10, seed=5).state_dict()
    with pytest.raises(DataError, match="num_windows"):
        WindowSampler(TOKENS[:500], 10, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        WindowSampler(TOKENS, 10, seed=6).load_state_dict(state)


def test_too_few_tokens_is_an_error():
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(TOKENS[:5], 10, seed=0)


def test_eval_windows_are_fixed_and_spread():
    batches = eval_windows(TOKENS, 10, num_batches=2, batch_size=3)
    assert [starts(b) for b in batches] == [[0, 200, 400], [590, 790, 990]]
