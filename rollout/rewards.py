"""Reward functions: `fn(prompt: str, completion: str, answer: str | None) -> float`.

A user points `task.reward_fn=package.module:function` at their own function with that
signature. `score_batch` calls it per sample and never lets a bad return poison the batch:

- a function that raises, or returns something that is not a finite real number, is a
  *reward failure* for that sample. With `task.on_reward_error=zero` (default) the sample gets
  reward 0, the failure is counted (`reward.failures` metric) and logged with the sample's index
  and prompt; with `task.on_reward_error=raise` a RewardFunctionError naming the sample stops
  the step.
"""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

RewardFn = Callable[[str, str, "str | None"], float]


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, or that failed on a named sample."""


def exact_match(prompt: str, completion: str, answer: str | None) -> float:
    """1.0 when the completion (stripped of surrounding whitespace) equals the answer."""
    if answer is None:
        raise RewardFunctionError("exact_match needs an answer for every prompt")
    return 1.0 if completion.strip() == answer.strip() else 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match}


def load_reward_fn(spec: str) -> RewardFn:
    """`exact_match` or `package.module:function` -> the callable; a clear error otherwise."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise RewardFunctionError(
            f"task.reward_fn={spec!r} is unknown: expected one of {sorted(BUILTIN_REWARDS)} "
            "or 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardFunctionError(f"task.reward_fn={spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise RewardFunctionError(f"task.reward_fn={spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


@dataclass
class ScoredBatch:
    rewards: list[float]
    failures: list[tuple[int, str]]  # (sample index, reason)


def score_batch(
    fn: RewardFn,
    prompts: list[str],
    completions: list[str],
    answers: list[str | None],
    on_error: str = "zero",
) -> ScoredBatch:
    rewards: list[float] = []
    failures: list[tuple[int, str]] = []
    for i, (p, c, a) in enumerate(zip(prompts, completions, answers)):
        try:
            value = fn(p, c, a)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, expected a finite int or float")
            rewards.append(float(value))
        except Exception as e:  # a user function may raise anything; name the sample
            reason = f"sample {i} (prompt {p!r}, completion {c!r}): {type(e).__name__}: {e}"
            if on_error == "raise":
                raise RewardFunctionError(f"reward function failed on {reason}") from e
            log.warning("reward function failed on %s; reward set to 0", reason)
            failures.append((i, reason))
            rewards.append(0.0)
    return ScoredBatch(rewards=rewards, failures=failures)
