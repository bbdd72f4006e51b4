"""The RL driver's own pieces without Ray: its state round-trips through a checkpoint dict
(prompt position included), and a step's batch and rollout metrics match formulas."""
import json
import random

import pytest
import torch

from launch.rl_job import DriverState
from launch.rl_metrics import rollout_metrics
from rollout.batch import rl_batch
from rollout.results import RolloutBatch
from rollout.tasks import TaskConfig, build_task
from trainer.algos.advantages import EMABaseline, group_advantages


def test_driver_state_round_trips_with_the_dataset_position(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(10)))
    task = build_task(TaskConfig(name="dataset", path=str(f), seed=7))
    state = DriverState(step=5, version=9, rng=random.Random(1), advantages=EMABaseline(0.9), task=task)
    state.history["reward/mean"] = [0.1, 0.2]
    state.advantages(torch.tensor([1.0, 0.0]), 2)
    task.sample(13, state.rng)  # into the second epoch
    saved = json.loads(json.dumps(state.state_dict(), default=list))  # survives plain serialization
    saved["rng"] = state.rng.getstate()
    next_prompts = [s.prompt for s in task.sample(6, state.rng)]

    task2 = build_task(TaskConfig(name="dataset", path=str(f), seed=7))
    restored = DriverState(advantages=EMABaseline(0.9), task=task2)
    restored.load_state_dict(saved)
    assert (restored.step, restored.version, restored.history) == (5, 9, {"reward/mean": [0.1, 0.2]})
    assert restored.advantages.baseline == pytest.approx(0.5)
    assert [s.prompt for s in task2.sample(6, restored.rng)] == next_prompts


def _share(version, rewards, lengths, G=2):
    n = len(rewards)
    return RolloutBatch(worker_id=0, version=version, prompt_ids=[[1, 2]] * n,
                        tokens=torch.full((n, 3), 5), logprobs=torch.full((n, 3), -1.0),
                        lengths=torch.tensor(lengths), finished=torch.ones(n, dtype=torch.bool),
                        rewards=torch.tensor(rewards), reward_components={"exact_match": list(rewards)},
                        prompts=["p"] * (n // G), completions=["c"] * n, gen_s=0.5)


def test_rl_batch_and_rollout_metrics():
    shares = [_share(4, [1.0, 1.0, 0.0, 1.0], [1, 3, 2, 2]), _share(3, [0.0, 0.0, 0.5, 0.5], [3, 3, 1, 1])]
    batch = rl_batch(shares, 4, lambda r, g: group_advantages(r, g), 2, pad_id=0)
    m = rollout_metrics(shares, 4, 2)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert torch.equal(batch.rewards, rewards)
    assert torch.allclose(batch.advantages, group_advantages(rewards, 2))
    assert batch.current_version.tolist() == [True] * 4 + [False] * 4
    # rows: 2 prompt tokens then 3 completion columns; the rollout logprobs sit in those columns,
    # the loss covers each row's own completion length
    assert batch.input_ids.shape == (8, 5) and torch.equal(batch.old_logprobs[:, 2:], torch.full((8, 3), -1.0))
    assert batch.loss_mask.sum(1).tolist() == [1, 3, 2, 2, 3, 3, 1, 1]
    halves = batch.shard(2)
    assert [h.rows for h in halves] == [4, 4] and torch.equal(torch.cat([h.rewards for h in halves]), rewards)
    with pytest.raises(ValueError, match="8 rows does not split into 3"):
        batch.shard(3)
    assert m["reward/mean"] == pytest.approx(4.0 / 8)
    assert m["reward/std"] == pytest.approx(float(rewards.std()))
    assert m["reward/zero_std_frac"] == pytest.approx(3 / 4)  # groups (1,1), (0,0), (.5,.5) carry no signal
    assert m["response/length_max"] == 3 and m["response/length_mean"] == pytest.approx(16 / 8)
    assert m["reward/exact_match"] == pytest.approx(0.5)
    assert m["staleness/max"] == 1 and m["staleness/mean"] == pytest.approx(0.5)
    no_estimator = rl_batch(shares, 4, None, 2, pad_id=0)  # PPO: the trainer estimates
    assert no_estimator.advantages is None and "advantages" not in no_estimator.tensors()
