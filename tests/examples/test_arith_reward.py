"""The arith example's reward (examples/arith/reward.py) against hand-scored completions."""
from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("arith_reward", Path(__file__).resolve().parents[2] / "examples/arith/reward.py")
reward = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reward)


def test_exact_answers_score_one_and_partial_credit_needs_the_answer_s_length():
    completions = ["82", " 82 ", "72", "12", "2", "182", "x2", "9", "8"]
    answers = ["82"] * 7 + ["9", "9"]
    levels = [2] * 7 + [1, 1]
    # 72: last digit right, 1 of 2 -> 0.5 * 1/2; 12: same; "2" and "182": wrong length, no credit
    assert reward.score([""] * 9, completions, answers, levels) == [1.0, 1.0, 0.25, 0.25, 0.0, 0.0, 0.0, 1.0, 0.0]
