"""trainer/state_file.py: nested states round-trip through safetensors + JSON; nothing else does."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trainer.state_file import StateFileError, load_state, save_state


def test_round_trip_keeps_types_and_bits(tmp_path):
    np.random.seed(3)
    state = {
        "step": 7, "flag": True, "none": None, "lr": 0.1 + 0.2, "neg_zero": -0.0, "inf": float("inf"), "name": "x",
        "python_rng": random.Random(1).getstate(), "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
        "masks": {"h.0.w": torch.rand(4, 8) > 0.5, "h.1.w": torch.randn(3, dtype=torch.bfloat16)},
        "int_keys": {3: [1, (2, 3)], (1, "a"): "tuple key"}, "$dollar": {"$tensor": "not a tag"},
        "np_scalar": np.float32(1.5), "empty": torch.zeros(0, 3), "nan": float("nan"),
    }
    save_state(tmp_path / "s.safetensors", state)
    got = load_state(tmp_path / "s.safetensors")
    assert got["python_rng"] == state["python_rng"]
    random.Random().setstate(got["python_rng"])  # the shape Python's random expects
    assert got["numpy_rng"][0] == "MT19937" and np.array_equal(got["numpy_rng"][1], state["numpy_rng"][1])
    assert got["numpy_rng"][1].dtype == np.uint32 and got["numpy_rng"][2:4] == state["numpy_rng"][2:4]
    assert torch.equal(got["torch_rng"], state["torch_rng"]) and got["torch_rng"].dtype == torch.uint8
    for k in ("h.0.w", "h.1.w"):
        assert got["masks"][k].dtype == state["masks"][k].dtype and torch.equal(got["masks"][k], state["masks"][k])
    assert got["int_keys"] == {3: [1, (2, 3)], (1, "a"): "tuple key"}
    assert got["$dollar"] == {"$tensor": "not a tag"}
    assert got["lr"] == 0.1 + 0.2 and math.copysign(1, got["neg_zero"]) == -1 and got["inf"] == float("inf")
    assert math.isnan(got["nan"]) and got["np_scalar"] == 1.5 and got["empty"].shape == (0, 3)
    assert {k: got[k] for k in ("step", "flag", "none", "name")} == {"step": 7, "flag": True, "none": None, "name": "x"}


class Custom:
    pass


def test_objects_without_a_code_free_form_are_refused_naming_where(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['obj'\]: a .*Custom cannot be checkpointed"):
        save_state(tmp_path / "s.safetensors", {"extra": {"obj": Custom()}})


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b"\x80\x04garbage"), "cannot read"),
    (lambda p: torch.save({"a": 1}, p), "cannot read"),
    (lambda p: save_file({"t0": torch.zeros(1)}, str(p)), "not a state file"),
    (lambda p: save_file({"t0": torch.zeros(1)}, str(p), {"format": "sparsetrain-state/1", "tree": "[]"}),
     r"\['t0'\] are not referenced"),
    (lambda p: save_file({}, str(p), {"format": "sparsetrain-state/1", "tree": json.dumps({"$tensor": "t9"})}),
     "names no"),
    (lambda p: save_file({}, str(p), {"format": "sparsetrain-state/1", "tree": "[" * 100 + "]" * 100}), "deeper"),
    (lambda p: save_file({}, str(p), {"format": "sparsetrain-state/1", "tree": '{"$eval": "1"}'}), "unknown tag"),
])
def test_bad_files_are_a_typed_error(tmp_path, write, message):
    path = tmp_path / "s.safetensors"
    write(path)
    with pytest.raises(StateFileError, match=message):
        load_state(path)
