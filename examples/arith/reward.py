"""Reward for examples/arith: exact answers score 1; on hard prompts (difficulty >= 2) a wrong
answer with as many digits as the right one still earns partial credit for each trailing digit
it gets right. (Without the length condition a policy learns to answer only the last digit: an
easy 0.25 on every hard prompt, which RL found and took instead of learning to add.)

Called once per batch by the RL job (rollout/rewards.py), with the dataset's other columns by
name: `answer` and `difficulty` are lists aligned with `completions`.

    python -m launch.rl task=dataset task.path=examples/arith/train.parquet \
        task.reward_fns=[examples/arith/reward.py:score] ...
"""


def score(prompts, completions, answer, difficulty, **_):
    rewards = []
    for completion, want, level in zip(completions, answer, difficulty):
        got = completion.strip()
        if got == want:
            rewards.append(1.0)
        elif level >= 2 and got.isdigit() and len(got) == len(want):
            right = 0
            for a, b in zip(reversed(got), reversed(want)):
                if a != b:
                    break
                right += 1
            rewards.append(0.5 * right / len(want))
        else:
            rewards.append(0.0)
    return rewards
