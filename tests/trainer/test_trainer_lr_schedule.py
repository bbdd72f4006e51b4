"""trainer/lr_schedule.py against the warmup + cosine formula written out by hand."""
import math

import pytest

from trainer.config import OptimizerConfig
from trainer.lr_schedule import lr_at


@pytest.mark.parametrize("step, expected", [
    (0, 1e-3 * 1 / 10), (4, 1e-3 * 5 / 10), (9, 1e-3),
    (10, 1e-3),  # start of the cosine
    (60, 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4),  # halfway
    (110, 1e-4), (500, 1e-4),  # end and beyond
])
def test_warmup_then_cosine(step, expected):
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(step, cfg, max_steps=110) == pytest.approx(expected, rel=1e-12)
