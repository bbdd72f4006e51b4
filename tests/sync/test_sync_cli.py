"""`python -m sync encode/apply/inspect` on safetensors checkpoints of a (briefly) trained GPT."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sync_helpers import assert_same_state

ROOT = Path(__file__).resolve().parents[2]


def _main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process (same code path as `python -m sync`, minus interpreter start-up)."""
    from sync.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "sync", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """bf16 checkpoints of a small GPT before and after a few AdamW steps (fp32 masters)."""
    from models import build_model
    from models.config import ModelConfig

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    d = tmp_path_factory.mktemp("ckpt")

    def save(name):
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.named_parameters()}
        save_file(state, d / name, metadata={"step": name})
        return d / name

    base = save("base.safetensors")
    for _ in range(3):
        x = torch.randint(0, 256, (4, 32))
        logits = model(x).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    new = save("new.safetensors")
    return d, base, new


@pytest.mark.parametrize("fast", [False, True])
def test_encode_apply_round_trip_is_byte_identical(checkpoints, fast):
    d, base, new = checkpoints
    delta, out = d / f"delta{fast}.spdl", d / f"out{fast}.safetensors"
    enc = _run("encode", base, new, "-o", delta, *(["--fast"] if fast else []))
    assert "ratio" in enc.stdout
    _run("apply", base, delta, "-o", out)
    assert out.read_bytes() == new.read_bytes()
    assert_same_state(load_file(out), load_file(new))
    assert delta.stat().st_size < new.stat().st_size / 2


def test_a_reader_that_stops_early_gets_no_error_blaming_the_input(checkpoints, capsys):
    d, base, new = checkpoints
    delta = d / "pipe.spdl"
    assert _main(capsys, "encode", base, new, "-o", delta)[0] == 0
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` that has already exited: every write to stdout fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "sync", "inspect", str(delta), "--json"], cwd=ROOT,
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert "error" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_inspect_reports_versions_tensors_and_ratio(checkpoints, capsys):
    import json

    d, base, new = checkpoints
    delta = d / "inspect.spdl"
    assert _main(capsys, "encode", base, new, "-o", delta, "--base-version", 4, "--target-version", 9)[0] == 0
    code, text, _ = _main(capsys, "inspect", delta)
    assert code == 0
    assert "delta 4 -> 9" in text and "h.0.attn.c_attn.weight" in text and "ratio" in text
    info = json.loads(_main(capsys, "inspect", delta, "--json")[1])
    b, n = load_file(base), load_file(new)
    changed = sum(int(torch.count_nonzero(b[k].view(torch.int16) != n[k].view(torch.int16))) for k in n)
    assert info["changed"] == changed
    assert info["payload_bytes"] < info["dense_bytes"] == sum(t.numel() * 2 for t in n.values())


def test_bad_inputs_give_typed_errors_without_traceback(checkpoints, tmp_path, capsys):
    d, base, new = checkpoints
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a delta file at all")
    cases = [
        (("apply", base, junk, "-o", tmp_path / "o"), "NotADeltaError"),
        (("inspect", junk), "NotADeltaError"),
        (("encode", junk, new, "-o", tmp_path / "d"), "BadInputError"),
        (("apply", base, tmp_path / "missing", "-o", tmp_path / "o"), "BadInputError"),
    ]
    delta = d / "for-corruption.spdl"
    assert _main(capsys, "encode", base, new, "-o", delta)[0] == 0
    data = bytearray(delta.read_bytes())
    data[len(data) // 2] ^= 0x04
    bad = tmp_path / "flipped.spdl"
    bad.write_bytes(bytes(data))
    cases.append((("apply", base, bad, "-o", tmp_path / "o"), "CorruptBucketError"))
    trunc = tmp_path / "trunc.spdl"
    trunc.write_bytes(bytes(data[: len(data) // 3]))
    cases.append((("apply", base, trunc, "-o", tmp_path / "o"), "CorruptBucketError"))
    cases.append((("apply", new, delta, "-o", tmp_path / "o"), "TensorMismatchError"))  # wrong base checkpoint
    for args, err in cases:
        code, _, stderr = _main(capsys, *args)
        assert code == 2, (args, stderr)
        assert stderr.startswith(f"error: {err}") and "Traceback" not in stderr, (args, stderr)
    assert not (tmp_path / "o").exists()
    # and through the real entry point: one line on stderr, exit status 2
    proc = _run("apply", base, bad, "-o", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "CorruptBucketError" in proc.stderr and "Traceback" not in proc.stderr
