"""The RL job's config: defaults compose, and every bad input is named before any actor starts."""
import pytest

from launch.cluster import ClusterResourceError
from launch.rl_config import (
    RLConfigError, check_resources, compose_rl_config, derived_trainer_config, validate_rl_config,
)
from rollout.config import RolloutConfigError
from rollout.rewards import RewardFunctionError
from rollout.tasks import TaskConfigError


def test_default_demo_config_composes_and_validates():
    cfg = compose_rl_config([])
    validate_rl_config(cfg)
    assert cfg.rollout.workers == 2 and cfg.task.name == "reverse" and cfg.algo.name == "grpo"
    assert cfg.rl.mode == "sync" and cfg.cluster.trainers == 1
    t = derived_trainer_config(cfg)
    assert t.micro_batch_size == cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    assert t.max_steps == cfg.rl.sft_warmup_steps + cfg.rl.steps


@pytest.mark.parametrize("overrides, error, needle", [
    (["task.name=algebra"], TaskConfigError, "task.name='algebra'"),
    (["task.reward_fn=no_such_module:f"], RewardFunctionError, "task.reward_fn='no_such_module:f'"),
    (["task.reward_fn=fuzzy"], RewardFunctionError, "task.reward_fn='fuzzy'"),
    (["task=jsonl", "task.prompts_file=/nonexistent.jsonl"], TaskConfigError, "task.prompts_file"),
    (["rl.max_staleness=-1"], RLConfigError, "rl.max_staleness=-1"),
    (["rl.mode=eventually"], RLConfigError, "rl.mode='eventually'"),
    (["rollout.workers=0"], RolloutConfigError, "rollout.workers=0"),
    (["rollout.prompts_per_step=15"], RolloutConfigError, "rollout.prompts_per_step=15"),
    (["rollout.top_p=0"], RolloutConfigError, "rollout.top_p=0"),
    (["algo.name=a2c"], Exception, "algo.name='a2c'"),
    (["rollout.max_new_tokens=40"], RLConfigError, "model.block_size"),
    (["task=sort", "task.length=30"], RLConfigError, "model.block_size"),
])
def test_bad_input_is_named(overrides, error, needle):
    with pytest.raises(error) as e:
        validate_rl_config(compose_rl_config(overrides))
    assert needle in str(e.value)


def test_malformed_prompts_file_is_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n[1, 2]\n')
    with pytest.raises(TaskConfigError, match="line 2"):
        validate_rl_config(compose_rl_config(["task=jsonl", f"task.prompts_file={f}"]))


def test_more_workers_than_resources_is_named():
    cfg = compose_rl_config(["rollout.workers=8"])
    with pytest.raises(ClusterResourceError, match="rollout.workers=8"):
        check_resources(cfg, {"CPU": 2.0})
    check_resources(compose_rl_config([]), {"CPU": 2.0})  # the demo fits 2 cores
    pinned = compose_rl_config(["+rollout.resources={gpu_node: 1}"])
    with pytest.raises(ClusterResourceError, match="gpu_node"):
        check_resources(pinned, {"CPU": 8.0})
