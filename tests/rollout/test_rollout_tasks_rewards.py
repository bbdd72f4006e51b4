"""Tasks, batch reward functions, and how bad input is reported."""
import random

import pytest

from data.prompts import Sample
from rollout.rewards import (
    RewardFunctionError, build_reward_fns, exact_match, load_reward_fn, probe_reward_fns, score_batch,
)
from rollout.tasks import TaskConfig, TaskConfigError, build_task


def test_builtin_tasks_give_correct_answers():
    rng = random.Random(0)
    for p in build_task(TaskConfig(name="addition", digits=2)).sample(50, rng):
        a, b = p.prompt.rstrip("=").split("+")
        assert 10 <= int(a) <= 99 and int(p.answer) == int(a) + int(b)
    for p in build_task(TaskConfig(name="sort", length=5)).sample(20, rng):
        s = p.prompt[len("sort:"):-1]
        assert len(s) == 5 and p.answer == "".join(sorted(s))
    for p in build_task(TaskConfig(name="reverse", length=3)).sample(20, rng):
        assert p.answer == p.prompt[len("rev:"):-1][::-1]


def test_builtin_eval_set_is_fixed():
    task = build_task(TaskConfig(name="reverse", eval_prompts=5))
    assert [s.prompt for s in task.eval_samples()] == [s.prompt for s in task.eval_samples()]
    assert len(task.eval_samples()) == 5


def test_exact_match_is_batched():
    assert exact_match(["1+1="] * 3, ["2", " 2\n", "3"], answer=["2", "2", "2"]) == [1.0, 1.0, 0.0]
    with pytest.raises(RewardFunctionError, match="answer"):
        exact_match(["x"], ["y"])


def test_reward_fn_from_a_module_and_from_a_file(tmp_path):
    assert load_reward_fn("tests.rollout.user_rewards:length_reward")(["p"], ["abc"]) == [0.75]
    f = tmp_path / "my_reward.py"
    f.write_text("def score(prompts, completions, answer, difficulty, **_):\n"
                 "    return [float(c == a) * d for c, a, d in zip(completions, answer, difficulty)]\n")
    fn = load_reward_fn(f"{f}:score")
    assert fn(["p", "q"], ["1", "2"], answer=["1", "3"], difficulty=[2, 5]) == [2.0, 0.0]


@pytest.mark.parametrize("spec, needle", [
    ("fuzzy", "'fuzzy' is unknown"),
    ("no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
    ("rollout.rewards:nope", "has no function 'nope'"),
    ("/nonexistent/r.py:f", "the file '/nonexistent/r.py' does not exist"),
])
def test_unloadable_reward_fns_are_named(spec, needle):
    with pytest.raises(RewardFunctionError, match="task.reward_fns") as e:
        load_reward_fn(spec)
    assert needle in str(e.value)


def test_a_reward_file_without_the_function_is_named(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def other(prompts, completions, **_):\n    return [0.0] * len(completions)\n")
    with pytest.raises(RewardFunctionError, match=f"the file '{f}' has no function 'score'"):
        load_reward_fn(f"{f}:score")


def test_weights_must_match_the_functions():
    with pytest.raises(RewardFunctionError, match="task.reward_weights has 1 entries but task.reward_fns names 2"):
        build_reward_fns(["exact_match", "tests.rollout.user_rewards:length_reward"], [1.0])
    fns = build_reward_fns(["exact_match", "tests.rollout.user_rewards:length_reward"], [1.0, 0.5])
    assert [(f.name, f.weight) for f in fns] == [("exact_match", 1.0), ("length_reward", 0.5)]


def test_weighted_sum_per_function_rewards_and_columns_by_name():
    fns = build_reward_fns(["exact_match", "tests.rollout.user_rewards:length_reward",
                            "tests.rollout.user_rewards:only_answer"], [1.0, 0.5, 2.0])
    scored = score_batch(fns, ["a", "b"], ["ab", "xyzw"], {"answer": ["ab", "q"], "difficulty": [1, 2]})
    assert scored.components == {"exact_match": [1.0, 0.0], "length_reward": [0.5, 1.0], "only_answer": [1.0, 0.0]}
    assert scored.rewards == [1.0 + 0.25 + 2.0, 0.5]
    assert scored.failures == []


def test_reward_fn_is_called_once_per_batch():
    calls = []

    def fn(prompts, completions, **columns):
        calls.append((list(prompts), sorted(columns)))
        return [0.0] * len(completions)

    from rollout.rewards import RewardFunction

    score_batch([RewardFunction("fn", "fn", fn)], ["a", "b", "c"], ["1", "2", "3"], {"answer": [1, 2, 3], "k": [0] * 3})
    assert calls == [(["a", "b", "c"], ["answer", "k"])]


def test_failures_give_zero_are_counted_and_named():
    fns = build_reward_fns(["tests.rollout.user_rewards:flaky"], [])
    scored = score_batch(fns, ["a=", "b=", "c="], ["ok", "nan", "str"], {})
    assert scored.rewards == [1.0, 0.0, 0.0]
    assert [i for i, _ in scored.failures] == [1, 2]
    assert "row 1 (prompt 'b='" in scored.failures[0][1] and "'x'" in scored.failures[1][1]
    with pytest.raises(RewardFunctionError, match=r"row 1 \(prompt 'b='"):
        score_batch(fns, ["a=", "b="], ["ok", "nan"], {}, on_error="raise")
    raising = build_reward_fns(["tests.rollout.user_rewards:raises"], [])
    scored = score_batch(raising, ["a", "b"], ["x", "y"], {})
    assert scored.rewards == [0.0, 0.0] and len(scored.failures) == 2 and "boom" in scored.failures[0][1]


def test_a_slow_reward_fn_times_out_as_a_failure():
    fns = build_reward_fns(["tests.rollout.user_rewards:slow"], [])
    scored = score_batch(fns, ["a"], ["x"], {}, timeout_s=0.2)
    assert scored.rewards == [0.0] and "TimeoutError" in scored.failures[0][1]


def test_wrong_length_is_an_error_and_the_probe_catches_non_numbers():
    fns = build_reward_fns(["tests.rollout.user_rewards:too_short"], [])
    with pytest.raises(RewardFunctionError, match="returned 1 values for a batch of 2"):
        score_batch(fns, ["a", "b"], ["x", "y"], {})
    with pytest.raises(RewardFunctionError, match="too_short"):
        probe_reward_fns(fns, ["a", "b"], {})
    with pytest.raises(RewardFunctionError, match="returned None for row 0"):
        probe_reward_fns(build_reward_fns(["tests.rollout.user_rewards:returns_none"], []), ["a", "b"], {})
    probe_reward_fns(build_reward_fns(["tests.rollout.user_rewards:raises"], []), ["a"], {})  # not judged


def test_unknown_task_is_named(tmp_path):
    with pytest.raises(TaskConfigError, match="task.name='algebra'"):
        build_task(TaskConfig(name="algebra"))
    with pytest.raises(TaskConfigError, match="task.path"):
        build_task(TaskConfig(name="dataset"))


def test_dataset_task_draws_every_prompt_once_per_epoch(tmp_path):
    import json

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(5)))
    task = build_task(TaskConfig(name="dataset", path=str(f)))
    first = task.sample(5, random.Random(0))
    assert sorted(s.prompt for s in first) == [f"q{i}" for i in range(5)]
    assert all(s.columns == {"answer": s.prompt[1:]} for s in first)
    assert isinstance(first[0], Sample)
