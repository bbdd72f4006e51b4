"""The command line as a user meets it (launch/cli.py, launch/console.py): unknown keys refused
with or without `+` before any run directory exists, user errors as one line with exit code 2,
Ctrl-C as one line naming the checkpoint to resume, and a finished run that says where it is and
what it did."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import (
    Preflight, UnknownConfigKeyError, check_override_keys, job_error_types, one_line, remove_unsaved_run_dir, schema_keys,
    user_error,
)
from launch.config import PretrainConfig
from launch.rl_config import RLJobConfig

ROOT = Path(__file__).resolve().parents[2]
TINY_RL = ["model=gpt_tiny", "model.block_size=32", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
           "rl.sft_warmup_steps=2", "rl.log_every=1", "rl.lr_warmup_steps=0", "cluster.trainers=1",
           "rollout.workers=1", "sync.verify_every=0"]


def run_cli(job: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"launch.{job}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("override", ["rl.step=10", "+rl.step=10", "++rl.step=10", "~rl.step"])
def test_a_misspelled_key_is_refused_with_or_without_plus_naming_the_real_one(override):
    with pytest.raises(UnknownConfigKeyError, match=r"rl\.step\b.*did you mean rl\.steps\?"):
        check_override_keys([override], RLJobConfig)


def test_a_key_that_only_starts_like_hydra_is_not_hydra_s():
    with pytest.raises(UnknownConfigKeyError):
        check_override_keys(["hydrax.foo=1"], RLJobConfig)


@pytest.mark.parametrize("override", ["rl.steps=3", "model=hf", "sparsity=nm", "hydra.run.dir=/x", "+rl.resume=auto",
                                      "+cluster.resources_per_trainer={node_a: 0.01}",
                                      "cluster.resources_per_trainer.node_b=1", "rollout.vllm.max_model_len=64"])
def test_real_keys_group_choices_hydra_settings_and_dict_entries_pass(override):
    check_override_keys([override], RLJobConfig)


def test_schema_keys_walk_nested_dataclasses_and_open_dicts():
    keys = schema_keys(PretrainConfig)
    assert keys["trainer.max_steps"] is False and keys["trainer"] is False
    assert keys["cluster.resources_per_trainer"] is True  # a dict: any entry may be added
    assert "sparsity.n" in keys and "resume" in keys
    with pytest.raises(UnknownConfigKeyError, match="did you mean trainer.max_steps"):
        check_override_keys(["+trainer.max_step=3"], PretrainConfig)


def test_one_line_flattens_the_message_and_keeps_a_composition_error_s_cause():
    try:
        try:
            raise ValueError("Value 'abc' of type 'str' could not be converted to Integer\n    full_key: rl.steps")
        except ValueError as cause:
            raise RuntimeError("Error merging override rl.steps=abc") from cause
    except RuntimeError as e:
        line = one_line(e)
    assert line == ("error: RuntimeError: Error merging override rl.steps=abc: "
                    "Value 'abc' of type 'str' could not be converted to Integer")
    assert "\n" not in one_line(ValueError("two\nlines"))


def test_an_error_raised_in_an_actor_is_classified_by_its_cause_and_a_bug_is_not_a_user_error():
    from omegaconf.errors import ConfigAttributeError
    from ray.exceptions import RayTaskError

    from rollout.rewards import RewardFunctionError

    wrapped = RayTaskError("score", "remote traceback...", RewardFunctionError("reward fn 'score' returned 3 values for 4 rows"))
    assert isinstance(user_error(wrapped, job_error_types()), RewardFunctionError)
    for bug in (KeyError("bug"), ZeroDivisionError(), FileNotFoundError("/internal"), ConfigAttributeError("x")):
        assert user_error(bug, job_error_types()) is None, bug  # inside the job these are bugs: traceback


def test_an_unsaved_run_dir_goes_with_the_parents_the_job_created_and_nothing_else(tmp_path):
    anchor = tmp_path / "runs"
    anchor.mkdir()
    fresh = anchor / "2026-12-03" / "15-00-00"
    pre = Preflight(fresh, existed=False, anchor=anchor)
    (fresh / "wandb" / "offline-run-x").mkdir(parents=True)
    (fresh / ".hydra").mkdir()
    (fresh / "rl.log").write_text("run dir: ...\n")
    assert remove_unsaved_run_dir(fresh, pre, "rl.log")
    assert anchor.exists() and not (anchor / "2026-12-03").exists()

    saved = anchor / "kept"
    (saved / "checkpoints" / "step_00000003").mkdir(parents=True)
    assert not remove_unsaved_run_dir(saved, Preflight(saved, False, anchor), "rl.log") and saved.exists()
    existing = anchor / "resumed"
    existing.mkdir()
    (existing / "rl.log").write_text("")
    assert not remove_unsaved_run_dir(existing, Preflight(existing, True, anchor), "rl.log") and existing.exists()
    other = anchor / "other"  # a directory Hydra used that is not the one the preflight settled on
    other.mkdir()
    assert not remove_unsaved_run_dir(other, Preflight(anchor / "elsewhere", False, anchor), "rl.log")
    assert other.exists()


def test_cli_a_refused_job_never_removes_a_directory_that_existed(tmp_path):
    """`nonexist/..` resolves to an existing directory: it must survive the job's refusal."""
    important = tmp_path / "important"
    important.mkdir()
    (important / "keep.txt").write_text("precious")
    out = run_cli("rl", "task=dataset", "task.path=missing.parquet",
                  f"hydra.run.dir={tmp_path}/nonexist/../important", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert (important / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("override", ["+rl.step=10", "rl.step=10"])
def test_cli_refuses_an_unknown_key_in_one_line_with_exit_2_and_no_run_dir(tmp_path, override):
    run_dir = tmp_path / "a" / "b"
    out = run_cli("rl", override, f"hydra.run.dir={run_dir}", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert "rl.steps" in out.stderr
    assert not (tmp_path / "a").exists()


def test_cli_a_missing_dataset_is_one_error_line_exit_2_and_no_run_dir(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    out = run_cli("rl", "task=dataset", "task.path=missing.parquet", f"hydra.run.dir={run_dir}", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: PromptDataError: task.path='missing.parquet' does not exist"]
    assert not (tmp_path / "runs").exists()


def test_cli_pretrain_refuses_a_bad_value_before_its_run_dir_exists(tmp_path):
    out = run_cli("pretrain", "sparsity=nm", "sparsity.n=5", f"hydra.run.dir={tmp_path / 'p'}", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: SparsityConfigError: ") and "sparsity.n" in out.stderr
    assert not (tmp_path / "p").exists()


def test_cli_finished_run_prints_its_dir_first_and_summary_last_and_keeps_log_and_curves(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("rl", *TINY_RL, "rl.steps=3", "logger.console=false", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert lines[0] == f"run dir: {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    tail = "\n".join(lines[-8:])
    assert f"done: {summary['rl_steps']} RL steps" in tail and str(run_dir / "model.safetensors") in tail
    assert "wandb sync " in tail
    log = (run_dir / "rl.log").read_text()
    assert log.startswith(f"run dir: {run_dir}") and "rl step 3/3" in log and "done: 3 RL steps" in log
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_sigint_stops_with_one_line_naming_the_checkpoint_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.rl", *TINY_RL, "rl.steps=500", "rl.checkpoint_every=2",
           "logger.console=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        steps = run_dir / "steps.jsonl"
        while not (steps.exists() and len(steps.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err + out
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: saved ") and "rl.resume=auto" in last and f"hydra.run.dir={run_dir}" in last
    ckpt = Path(last.split("interrupted: saved ")[1].split(";")[0])
    assert ckpt.parent == run_dir / "checkpoints" and (ckpt / "manifest.json").exists()
