"""README.md's commands as a user pastes them (scripts/check_readme.py): every job command's
config composes under the job's own command-line check; `-m slow` runs every one of them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from check_readme import compose_all, lowered, readme_commands, sweep_points  # noqa: E402


def test_the_parser_joins_continued_lines_drops_comments_and_splits_and(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("text\n```bash\nbash scripts/setup.sh && .venv/bin/python -m launch.rl   # run it\n"
                      "python -m launch.pretrain sparsity=nm \\\n    'data.paths=[a b/*.txt]'  # two lines\n```\n"
                      "```python\npython -m launch.rl not.bash=1\n```\n")
    cmds = readme_commands(readme)
    assert [(c.line, c.kind, c.job, c.overrides) for c in cmds] == [
        (3, "not-run", None, []), (3, "job", "rl", []), (4, "job", "pretrain", ["sparsity=nm", "data.paths=[a b/*.txt]"])]


def test_lowering_only_shortens_and_a_sweep_is_checked_point_by_point():
    assert lowered("rl", ["rl.eval_every=50", "rollout.max_new_tokens=128"]) == [
        "rl.steps=3", "rl.sft_warmup_steps=2", "rl.eval_every=2", "rollout.max_new_tokens=8"]
    assert sweep_points(["-m", "sparsity=dense,nm", "x=1"]) == [["sparsity=dense", "x=1"], ["sparsity=nm", "x=1"]]
    assert sweep_points(["--multirun", "a=1,2", "b=x,y"]) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    assert lowered("rl", ["rollout.max_new_tokens=8,16"])[-1] == "rollout.max_new_tokens=8"


def test_every_job_command_in_the_readme_composes():
    results = compose_all(readme_commands())
    assert len(results) >= 15, "README job commands not found: did the parser or the README change?"
    failed = [f"README:{cmd.line} {cmd.text}: {error}" for cmd, error in results if error is not None]
    assert not failed, "\n".join(failed)


@pytest.mark.slow
def test_every_job_command_in_the_readme_runs_to_exit_0():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_readme.py"), "--run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-5000:]
