"""Tasks, reward functions, and how bad input is reported."""
import json
import random

import pytest

from rollout.rewards import RewardFunctionError, exact_match, load_reward_fn, score_batch
from rollout.tasks import TaskConfig, TaskConfigError, build_task


def test_builtin_tasks_give_correct_answers():
    rng = random.Random(0)
    add, _ = build_task(TaskConfig(name="addition", digits=2))
    for p in add.sample(50, rng):
        a, b = p.text.rstrip("=").split("+")
        assert 10 <= int(a) <= 99 and int(p.answer) == int(a) + int(b)
    srt, _ = build_task(TaskConfig(name="sort", length=5))
    for p in srt.sample(20, rng):
        s = p.text[len("sort:"):-1]
        assert len(s) == 5 and p.answer == "".join(sorted(s))
    rev, _ = build_task(TaskConfig(name="reverse", length=3))
    for p in rev.sample(20, rng):
        assert p.answer == p.text[len("rev:"):-1][::-1]


def test_exact_match():
    assert exact_match("1+1=", "2", "2") == 1.0
    assert exact_match("1+1=", " 2\n", "2") == 1.0
    assert exact_match("1+1=", "3", "2") == 0.0


def test_jsonl_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hi=", "answer": "ih"}) + "\n\n" + json.dumps({"prompt": "x="}) + "\n")
    task, fn = build_task(TaskConfig(name="jsonl", prompts_file=str(f)))
    got = {(p.text, p.answer) for p in task.sample(50, random.Random(0))}
    assert got == {("hi=", "ih"), ("x=", None)}


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "a"}\n{not json\n', "line 2"),
    ('{"answer": "a"}\n', "line 1"),
    ('{"prompt": "a", "answer": 3}\n', "'answer'"),
    ("\n", "no prompts"),
])
def test_malformed_prompts_file_is_named(tmp_path, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(TaskConfigError, match="task.prompts_file") as e:
        build_task(TaskConfig(name="jsonl", prompts_file=str(f)))
    assert needle in str(e.value)


def test_unknown_task_and_reward_fn_are_named(tmp_path):
    with pytest.raises(TaskConfigError, match="task.name='algebra'"):
        build_task(TaskConfig(name="algebra"))
    with pytest.raises(TaskConfigError, match="does not exist"):
        build_task(TaskConfig(name="jsonl", prompts_file=str(tmp_path / "none.jsonl")))
    with pytest.raises(RewardFunctionError, match="task.reward_fn='fuzzy'"):
        load_reward_fn("fuzzy")
    with pytest.raises(RewardFunctionError, match="cannot import module 'no_such_pkg.mod'"):
        load_reward_fn("no_such_pkg.mod:f")
    with pytest.raises(RewardFunctionError, match="has no function 'nope'"):
        load_reward_fn("rollout.rewards:nope")


def test_user_reward_fn_from_config():
    fn = load_reward_fn("tests.rollout.user_rewards:length_reward")
    assert fn("p", "abc", None) == 0.75


def test_failing_reward_fn_gives_zero_and_names_the_sample():
    from tests.rollout.user_rewards import flaky

    scored = score_batch(flaky, ["a=", "b=", "c=", "d="], ["ok", "boom", "nan", "str"], [None] * 4)
    assert scored.rewards == [1.0, 0.0, 0.0, 0.0]
    assert [i for i, _ in scored.failures] == [1, 2, 3]
    assert "sample 1" in scored.failures[0][1] and "'b='" in scored.failures[0][1]
    assert "nan" in scored.failures[1][1] and "'x'" in scored.failures[2][1]
    with pytest.raises(RewardFunctionError, match=r"sample 1 \(prompt 'b='"):
        score_batch(flaky, ["a=", "b="], ["ok", "boom"], [None, None], on_error="raise")
