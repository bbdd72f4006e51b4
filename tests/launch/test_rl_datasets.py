"""The RL job on a user's Parquet train/eval set with a reward function given as a file path:
the reward is called in batches with the dataset's columns, the eval metrics reach summary.json,
the offline wandb run holds a samples table, and PPO logs its value loss."""
from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster_nodes import HEAD_NODE, SECOND_NODE
from launch.rl import run_rl
from launch.rl_config import compose_rl_config
from wandb_records import wandb_history

pytestmark = pytest.mark.ray

REWARD = '''
import json


def score(prompts, completions, answer, difficulty, **_):
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"n": len(completions), "answer": answer, "difficulty": difficulty,
                            "prompts": prompts}}) + "\\n")
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
'''


def write_data(tmp_path):
    def rows(n, seed):
        import random

        rng = random.Random(seed)
        out = []
        for _ in range(n):
            d = rng.choice([1, 2])
            a, b = (rng.randint(0, 9), rng.randint(0, 9)) if d == 1 else (rng.randint(10, 99), rng.randint(10, 99))
            out.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "difficulty": d})
        return out

    pq.write_table(pa.Table.from_pylist(rows(40, 0)), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows(6, 1)), tmp_path / "eval.parquet")
    log = tmp_path / "calls.jsonl"
    (tmp_path / "my_reward.py").write_text(REWARD.format(log=str(log)))
    return log


def test_parquet_dataset_file_reward_eval_samples_table_and_ppo(ray_cluster, tmp_path):
    log = write_data(tmp_path)
    run_dir = tmp_path / "run"
    cfg = compose_rl_config([
        "model=gpt_tiny", "model.block_size=32", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
        "rl.sft_warmup_steps=2", "rl.log_every=1", "rl.lr_warmup_steps=0", "rl.steps=4", "rl.export=false",
        "task=dataset", f"task.path={tmp_path / 'train.parquet'}", f"task.eval_path={tmp_path / 'eval.parquet'}",
        f"task.reward_fns=[{tmp_path / 'my_reward.py'}:score]", "rl.eval_every=2", "rl.eval_samples=3",
        "algo=ppo", "logger=wandb_offline", "logger.console=false", "logger.samples_every=2",
        f"+cluster.resources_per_trainer={{{HEAD_NODE}: 0.01}}", f"+rollout.resources={{{SECOND_NODE}: 0.01}}"])
    summary = run_rl(cfg, run_dir)

    # The reward was called once per batch with both columns, aligned with the prompts.
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    train_calls = [c for c in calls if c["n"] == 2 * 2]  # a worker's share: 2 prompts x 2 samples
    assert len(train_calls) >= 2 * 4  # 2 workers x 4 steps (+ eval calls of other sizes)
    for c in calls:
        assert len(c["answer"]) == len(c["difficulty"]) == len(c["prompts"]) == c["n"]
        assert all(isinstance(d, int) and d in (1, 2) for d in c["difficulty"])
        for p, a in zip(c["prompts"], c["answer"]):
            x, y = p.rstrip("=").split("+")
            assert int(x) + int(y) == int(a)

    # Evaluation: in summary.json, k in the name; eval at start, steps 2 and 4.
    written = json.loads((run_dir / "summary.json").read_text())
    for key in ("eval/reward_mean", "eval/pass@3", "eval/reward_mean_first"):
        assert key in written and 0.0 <= written[key] <= 1.0, key
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/pass@3" in r] == [2, 4]

    # PPO: value loss and the policy metrics users expect, every step.
    for key in ("train/value_loss", "train/entropy", "train/clip_frac", "train/approx_kl", "reward/std",
                "reward/zero_std_frac", "response/length_mean", "response/length_max", "reward/score"):
        assert all(key in r for r in rows), key
    assert all(r["train/value_loss"] >= 0 for r in rows)

    # The offline wandb run: a samples table at steps 2 and 4, and a name from the job.
    # wandb's service process writes the offline run file asynchronously: read until it holds the
    # tables (bounded), since in a long pytest session the shared service can lag the job's end.
    deadline = time.time() + 60
    while True:
        history = wandb_history(run_dir)
        tables = [r for r in history if r.get("samples/_type") == "table-file"]  # wandb flattens the table's keys
        if len(tables) >= 2 or time.time() > deadline:
            break
        time.sleep(1)
    assert [r["_step"] for r in tables] == [2, 4] and tables[0]["samples/nrows"] == 2 * 2  # a group per worker
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2, 4}
    assert set(samples[0]) == {"step", "version", "prompt", "completion", "reward", "reward/score"}
    assert summary["algo"] == "ppo" and summary["task"] == "dataset"
