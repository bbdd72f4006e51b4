"""trainer/checkpoint.py: atomic commit, never overwrite, validation of corrupt/misfit checkpoints."""
from __future__ import annotations

import json

import pytest

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
    assert manifest["step"] == 20 and manifest["files"] == {"ds/model.pt": len(b"weights")}
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


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "ds" / "model.pt").write_bytes(b"short"), "corrupt or truncated"),
    (lambda p: (p / "ds" / "model.pt").unlink(), "is missing ds/model.pt"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda p: (p / "manifest.json").unlink(), "incomplete"),
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
