"""The RL job's config: defaults compose, and every bad input is named before any actor starts."""
import pytest

from launch.cluster import ClusterResourceError
from launch.rl_config import (
    RLConfigError, check_resources, compose_rl_config, derived_trainer_config, validate_rl_config,
)
from rollout.config import RolloutConfigError
from rollout.rewards import RewardFunctionError
from data.prompts import PromptDataError
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
    (["task.reward_fns=[no_such_module:f]"], RewardFunctionError, "'no_such_module:f'"),
    (["task.reward_fns=[fuzzy]"], RewardFunctionError, "task.reward_fns: 'fuzzy' is unknown"),
    (["task.reward_fns=[exact_match]", "task.reward_weights=[1.0,2.0]"], RewardFunctionError,
     "task.reward_weights has 2 entries but task.reward_fns names 1"),
    (["task.reward_fns=[tests.rollout.user_rewards:too_short]"], RewardFunctionError, "returned 1 values"),
    (["task.reward_fns=[tests.rollout.user_rewards:returns_none]"], RewardFunctionError, "returned None"),
    (["task=dataset", "task.path=/nonexistent.parquet"], PromptDataError, "task.path='/nonexistent.parquet' does not exist"),
    (["task=dataset"], Exception, "task.path"),
    (["rl.eval_samples=0"], RLConfigError, "rl.eval_samples=0"),
    (["logger.samples_every=-1"], Exception, "logger.samples_every=-1"),
    (["rl.max_staleness=-1"], RLConfigError, "rl.max_staleness=-1"),
    (["rl.mode=eventually"], RLConfigError, "rl.mode='eventually'"),
    (["rollout.workers=0"], RolloutConfigError, "rollout.workers=0"),
    (["rollout.prompts_per_step=15"], RolloutConfigError, "rollout.prompts_per_step=15"),
    (["rollout.top_p=0"], RolloutConfigError, "rollout.top_p=0"),
    (["algo.name=a2c"], Exception, "algo.name='a2c'"),
    (["rollout.max_new_tokens=40"], RLConfigError, "model.block_size"),
    (["task=sort", "task.length=30"], RLConfigError, "model.block_size"),
    (["model.sparse_ift=wide", "model.sparse_ift_sparsity=0.75"], RLConfigError, "model.sparse_ift='wide'"),
])
def test_bad_input_is_named(overrides, error, needle):
    with pytest.raises(error) as e:
        validate_rl_config(compose_rl_config(overrides))
    assert needle in str(e.value)


def _dataset(tmp_path, rows, name="train.jsonl"):
    import json

    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_bad_datasets_are_named_before_anything_starts(tmp_path):
    empty = _dataset(tmp_path, [], "empty.jsonl")
    with pytest.raises(PromptDataError, match="holds no rows"):
        validate_rl_config(compose_rl_config(["task=dataset", f"task.path={empty}"]))
    no_prompt = _dataset(tmp_path, [{"question": "1+1=", "answer": "2"}], "q.jsonl")
    with pytest.raises(PromptDataError, match="no column 'prompt' \\(task.prompt_key\\)"):
        validate_rl_config(compose_rl_config(["task=dataset", f"task.path={no_prompt}"]))
    validate_rl_config(compose_rl_config(["task=dataset", f"task.path={no_prompt}", "task.prompt_key=question"]))
    no_answer = _dataset(tmp_path, [{"prompt": "1+1="}], "na.jsonl")
    with pytest.raises(RLConfigError, match="rl.sft_warmup_steps > 0 needs a string 'answer'"):
        validate_rl_config(compose_rl_config(["task=dataset", f"task.path={no_answer}",
                                              "task.reward_fns=[tests.rollout.user_rewards:length_reward]"]))
    good = _dataset(tmp_path, [{"prompt": "1+1=", "answer": "2"}], "good.jsonl")
    with pytest.raises(TaskConfigError, match="needs task.eval_path"):
        validate_rl_config(compose_rl_config(["task=dataset", f"task.path={good}", "rl.eval_every=5"]))


def test_a_reward_file_without_the_function_is_named(tmp_path):
    f = tmp_path / "reward.py"
    f.write_text("def correct(prompts, completions, **_):\n    return [0.0] * len(completions)\n")
    validate_rl_config(compose_rl_config([f"task.reward_fns=[{f}:correct]"]))
    with pytest.raises(RewardFunctionError, match=f"the file '{f}' has no function 'score'"):
        validate_rl_config(compose_rl_config([f"task.reward_fns=[{f}:score]"]))


def test_chat_prompts_need_a_template_or_the_byte_fallback(tmp_path, monkeypatch):
    from rollout import batch

    chat = _dataset(tmp_path, [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}], "chat.jsonl")
    validate_rl_config(compose_rl_config(["task=dataset", f"task.path={chat}", "model.block_size=64"]))  # byte: fallback
    monkeypatch.setattr("models.tokenizer.ByteTokenizer", type("Other", (), {}))  # no fallback for others
    with pytest.raises(batch.ChatTemplateError, match="no chat template"):
        validate_rl_config(compose_rl_config(["task=dataset", f"task.path={chat}", "model.block_size=64"]))


def test_more_workers_than_resources_is_named():
    cfg = compose_rl_config(["rollout.workers=8"])
    with pytest.raises(ClusterResourceError, match="rollout.workers=8"):
        check_resources(cfg, {"CPU": 2.0})
    check_resources(compose_rl_config([]), {"CPU": 2.0})  # the demo fits 2 cores
    pinned = compose_rl_config(["+rollout.resources={gpu_node: 1}"])
    with pytest.raises(ClusterResourceError, match="gpu_node"):
        check_resources(pinned, {"CPU": 8.0})


def test_run_name_comes_from_the_job_and_its_overrides():
    from launch.loggers import run_name

    assert run_name("rl", ["algo=ppo", "task.path=/data/x/train.parquet", "hydra.run.dir=/o", "logger.mode=online"]) \
        == "rl algo=ppo task.path=train.parquet"
    assert run_name("rl", []) == "rl"
    assert len(run_name("rl", [f"k{i}=v" for i in range(100)])) == 120


# -- distill: an auxiliary RL loss toward the dense starting model (issue 12) ----------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from hf_fixtures import save_tiny_gpt2, save_tiny_llama

    root = tmp_path_factory.mktemp("hf")
    return {"llama": save_tiny_llama(root / "llama", with_tokenizer=False),
            "gpt2": save_tiny_gpt2(root / "gpt2", with_tokenizer=False)}


HF_RL = ["rollout.max_new_tokens=4", "logger=console", "logger.console=false"]


@pytest.mark.parametrize("overrides, needle", [
    (["distill=squarehead"], "distill=squarehead distils from the pretrained dense model, but model.kind='gpt'"),
    (["distill=kl", "distill.teacher_path={llama}"], "model.kind='gpt'"),  # built-in GPT: no teacher, even so
    (["model=hf", "model.path={llama}", "distill=squarehead", "distill.weight=-1"], "distill.weight=-1"),
    (["model=hf", "model.path={llama}", "distill=kl", "distill.weight=0"], "distill.weight=0"),
    (["model=hf", "model.path={llama}", "distill=kl", "distill.weight=inf"], "distill.weight=inf"),
    (["model=hf", "model.path={llama}", "distill=kl", "distill.temperature=0"], "distill.temperature=0"),
    (["model=hf", "model.path={llama}", "distill=squarehead", "distill.task_weight=0.5"], "distill.task_weight=0.5"),
    (["model=hf", "model.path={llama}", "distill=squarehead", "distill.teacher_path={gpt2}"],
     "model_type is 'gpt2' in the teacher, 'llama' in the student"),
])
def test_bad_distill_input_is_refused_before_ray_starts(overrides, needle, tiny_hf, tmp_path, monkeypatch):
    import launch.cluster
    from launch.rl import run_rl
    from trainer.distill import DistillConfigError

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was caught")

    monkeypatch.setattr(launch.cluster, "ray_cluster", no_ray)
    cfg = compose_rl_config([*HF_RL, *(o.format(**tiny_hf) for o in overrides)])
    with pytest.raises(DistillConfigError) as e:
        run_rl(cfg, tmp_path / "run")
    assert needle in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_distill_configs_that_work_validate_and_squarehead_needs_hidden_states(tiny_hf):
    import torch

    from launch.rl_config import validate_rl_distill_config
    from models import ModelConfig, build_model
    from trainer.distill import DistillConfig, DistillConfigError

    assert compose_rl_config([]).distill.name == "none"  # the default: RL unchanged
    for name in ("squarehead", "kl"):
        cfg = compose_rl_config([*HF_RL, "model=hf", f"model.path={tiny_hf['llama']}", f"distill={name}"])
        validate_rl_config(cfg)
        assert cfg.distill.name == name and cfg.distill.weight == 1.0 and cfg.distill.teacher_path is None
    with torch.device("meta"):
        gpt, _ = build_model(ModelConfig(kind="gpt", n_layer=1, n_embd=32, n_head=2, block_size=32))
    with pytest.raises(DistillConfigError, match="output_hidden_states"):  # a model without hidden states
        validate_rl_distill_config(DistillConfig(name="squarehead"), ModelConfig(kind="hf", path=str(tiny_hf["llama"])),
                                   gpt)
