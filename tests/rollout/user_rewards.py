"""Reward functions a user might point task.reward_fn at (used by the tests)."""


def length_reward(prompt: str, completion: str, answer: str | None) -> float:
    return min(1.0, len(completion) / 4)


def flaky(prompt: str, completion: str, answer: str | None):
    if completion == "boom":
        raise RuntimeError("boom")
    if completion == "nan":
        return float("nan")
    if completion == "str":
        return "x"
    return 1.0
