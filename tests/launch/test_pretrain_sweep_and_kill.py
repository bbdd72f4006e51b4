"""The CLI as users run it: a `-m` sweep over sparsity methods, and kill + `resume=auto`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from wandb_records import wandb_history  # noqa: E402

TINY = ["model=gpt_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=4", "trainer.eval_batches=2",
        "data.max_bytes=300000", "optimizer.warmup_steps=2", "optimizer.lr=3e-3"]


def test_multirun_sweep_runs_and_logs_every_method(tmp_path):
    cmd = [sys.executable, "-m", "launch.pretrain", "-m", "sparsity=dense,nm", *TINY, "cluster.trainers=1",
           "trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=0", "trainer.log_every=1",
           f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "summary.json").exists())
    methods = [json.loads((p / "summary.json").read_text())["sparsity_method"] for p in runs]
    assert methods == ["dense", "nm"]
    for run in runs:
        logged = {k for row in wandb_history(run) for k in row}
        assert {"train/loss", "eval/loss", "sparsity/density"} <= logged, run


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.pretrain", *TINY, "sparsity=nm", "cluster.trainers=2",
           "trainer.max_steps=40", "trainer.checkpoint_every=10", "trainer.keep_checkpoints=0",
           "trainer.eval_every=20", "logger.console=false", f"hydra.run.dir={run_dir}", *extra]
    # Own session: the kill takes the driver and the Ray it started down together.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_kill_mid_run_then_resume_auto_ends_like_an_uninterrupted_run(tmp_path):
    full = _launch(tmp_path / "full")
    _, err = full.communicate(timeout=500)
    assert full.returncode == 0, err[-3000:]
    expected = json.loads((tmp_path / "full" / "summary.json").read_text())

    victim = _launch(tmp_path / "killed")
    first_ckpt = tmp_path / "killed" / "checkpoints" / "step_00000010"
    deadline = time.time() + 400
    while not first_ckpt.exists():
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert not (tmp_path / "killed" / "checkpoints" / "step_00000040").exists()

    resumed = _launch(tmp_path / "killed", "resume=auto")
    _, err = resumed.communicate(timeout=500)
    assert resumed.returncode == 0, err[-3000:]
    got = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert got["resumed_from"] is not None and got["steps"] == 40
    assert got["train/loss_final"] == pytest.approx(expected["train/loss_final"], rel=1e-6, abs=1e-6)
    assert got["eval/loss_final"] == pytest.approx(expected["eval/loss_final"], rel=1e-6, abs=1e-6)
