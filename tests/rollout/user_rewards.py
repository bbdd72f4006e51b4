"""Reward functions a user might point task.reward_fns at (used by the tests): batch signature
fn(prompts, completions, **columns) -> list[float]."""
import time


def length_reward(prompts, completions, **columns):
    return [min(1.0, len(c) / 4) for c in completions]


def flaky(prompts, completions, **columns):
    out = []
    for c in completions:
        if c == "nan":
            out.append(float("nan"))
        elif c == "str":
            out.append("x")
        else:
            out.append(1.0)
    return out


def raises(prompts, completions, **columns):
    raise RuntimeError("boom")


def slow(prompts, completions, **columns):
    time.sleep(5)
    return [1.0] * len(completions)


def too_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def returns_none(prompts, completions, **columns):
    return [None] * len(completions)


def only_answer(prompts, completions, answer):
    """No **kwargs: gets only the `answer` column."""
    return [float(c == a) for c, a in zip(completions, answer)]
