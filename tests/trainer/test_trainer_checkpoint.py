"""trainer/checkpoint.py: atomic commit, never overwrite, validation of corrupt/misfit checkpoints."""
from __future__ import annotations

import json

import pytest
import xxhash

from trainer import checkpoint as ckpt


def staged(root, step, payload=b"weights"):
    staging = ckpt.new_staging_dir(root, step)
    (staging / "ds").mkdir()
    (staging / "ds" / "model.pt").write_bytes(payload)
    return staging


def test_commit_lists_latest_and_ignores_staging(tmp_path):
    for step in (10, 20):
        ckpt.commit(staged(tmp_path, step), tmp_path, step, {"world_size": 2})
    leftover = staged(tmp_path, 30)  # a run that died while writing step 30
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 20]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000020"
    assert leftover.exists()
    manifest = json.loads((tmp_path / "step_00000020" / "manifest.json").read_text())
    assert manifest["step"] == 20
    assert manifest["files"] == {"ds/model.pt": {"bytes": len(b"weights"), "xxh3_128": xxhash.xxh3_128_hexdigest(b"weights")}}
    assert ckpt.remove_staging(tmp_path) == [leftover] and not leftover.exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 20]


def test_commit_never_overwrites_an_existing_checkpoint(tmp_path):
    ckpt.commit(staged(tmp_path, 10, b"original"), tmp_path, 10, {})
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        ckpt.commit(staged(tmp_path, 10, b"imposter"), tmp_path, 10, {})
    assert (tmp_path / "step_00000010" / "ds" / "model.pt").read_bytes() == b"original"


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.commit(staged(tmp_path, step), tmp_path, step, {})
    ckpt.prune(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    ckpt.prune(tmp_path, keep=0)
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_validate_accepts_a_good_checkpoint(tmp_path):
    path = ckpt.commit(staged(tmp_path, 5), tmp_path, 5, {"world_size": 2, "param_shapes": {"w": [2, 4]}})
    manifest = ckpt.validate_checkpoint(path, {"world_size": 2, "param_shapes": {"w": [2, 4]}})
    assert manifest["step"] == 5


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "ds" / "model.pt").write_bytes(b"short"), "corrupt or truncated"),
    (lambda p: (p / "ds" / "model.pt").unlink(), "is missing ds/model.pt"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda p: (p / "manifest.json").unlink(), "incomplete"),
    (lambda p: (p / "ds" / "model.pt").write_bytes(b"weightS"), "ds/model.pt is corrupt: its xxh3_128 digest"),
    (lambda p: (p / "ds" / "extra.pt").write_bytes(b"x"), r"holds \['ds/extra.pt'\], which its manifest.json does not list"),
    (lambda p: edit_manifest(p, lambda m: m.update(format_version=1)), "format_version 1"),
    (lambda p: edit_manifest(p, lambda m: m["files"].update({"../x": m["files"]["ds/model.pt"]})), "outside the checkpoint"),
    (lambda p: edit_manifest(p, lambda m: m["files"].update({"ds/model.pt": 7})), "no byte count and xxh3_128"),
])
def test_validate_names_the_damage(tmp_path, damage, message):
    path = ckpt.commit(staged(tmp_path, 5), tmp_path, 5, {"world_size": 2})
    damage(path)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.validate_checkpoint(path, {"world_size": 2})


def test_validate_rejects_a_checkpoint_of_another_run_shape(tmp_path):
    path = ckpt.commit(staged(tmp_path, 5), tmp_path, 5, {"world_size": 2, "param_shapes": {"w": [2, 4], "b": [4]}})
    with pytest.raises(ckpt.CheckpointError, match="world_size=2, this run has 4"):
        ckpt.validate_checkpoint(path, {"world_size": 4})
    with pytest.raises(ckpt.CheckpointError, match=r"param_shapes differs at \['w'\]"):
        ckpt.validate_checkpoint(path, {"param_shapes": {"w": [4, 4], "b": [4]}})
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.validate_checkpoint(tmp_path / "step_00000099", {})


class _Group:
    """Stands in for a trainer group: writes one file per rank, or fails half way."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, path, extra):
        from pathlib import Path

        (Path(path) / "rank_00000.safetensors").write_bytes(json.dumps(extra.to_state()).encode())
        if self.fail:
            raise RuntimeError("rank 1 died")


def test_save_checkpoint_commits_prunes_and_cleans_its_staging_on_failure(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(_Group(), tmp_path, step, {"world_size": 1}, ckpt.CheckpointExtra(driver={"step": step}), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="rank 1 died"):
        ckpt.save_checkpoint(_Group(fail=True), tmp_path, 4, {"world_size": 1}, ckpt.CheckpointExtra(), keep=2)
    assert not list(tmp_path.glob(".staging-*"))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    with pytest.raises(ckpt.CheckpointError, match="already exists"):  # and its staging is gone too
        ckpt.save_checkpoint(_Group(), tmp_path, 3, {}, ckpt.CheckpointExtra(), keep=2)
    assert not list(tmp_path.glob(".staging-*"))


def test_find_resume_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.find_resume_checkpoint(None, root) is None
    assert ckpt.find_resume_checkpoint("auto", root) is None
    for step in (4, 8):
        ckpt.commit(staged(root, step), root, step, {})
    with pytest.raises(ckpt.ResumeError, match="pass resume=auto"):
        ckpt.find_resume_checkpoint(None, root)
    with pytest.raises(ValueError, match="pass rl.resume=auto"):
        ckpt.find_resume_checkpoint(None, root, key="rl.resume", error=ValueError)
    assert ckpt.find_resume_checkpoint("auto", root) == root / "step_00000008"
    assert ckpt.find_resume_checkpoint(str(root / "step_00000008"), root) == root / "step_00000008"
    # Resuming step 4 would write step 8 again: refused before anything trains.
    with pytest.raises(ckpt.ResumeError, match=r"newer checkpoints \['step_00000008'\]"):
        ckpt.find_resume_checkpoint(str(root / "step_00000004"), root)
    # From another run's directory: refused too when this run already went further.
    other = tmp_path / "other"
    ckpt.commit(staged(other, 6), other, 6, {})
    with pytest.raises(ckpt.ResumeError, match="newer checkpoints"):
        ckpt.find_resume_checkpoint(str(other / "step_00000006"), root)
    assert ckpt.find_resume_checkpoint(str(other / "step_00000006"), tmp_path / "fresh") == other / "step_00000006"


def test_checkpoint_extra_round_trips_and_refuses_sections_it_does_not_know():
    extra = ckpt.CheckpointExtra(driver={"rl_step": 3}, data={"epoch": 1}, algo_state={})
    assert ckpt.CheckpointExtra.from_state(json.loads(json.dumps(extra.to_state())), "x") == extra
    assert ckpt.CheckpointExtra.from_state({"driver": {"step": 2}}, "x") == ckpt.CheckpointExtra(driver={"step": 2})
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00001.safetensors: its extra section holds \['drivr'\]"):
        ckpt.CheckpointExtra.from_state({"drivr": {}}, "checkpoint c: rank_00001.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="holds list"):
        ckpt.CheckpointExtra.from_state([], "x")
