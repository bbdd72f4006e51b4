"""trainer/worker.py without Ray: one rank (world_size 1) through DeepSpeed on gloo."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from models import GPT, GPTConfig, ModelConfig
from trainer import checkpoint as ckpt
from trainer.checkpoint import CheckpointError, rank_file
from trainer.config import OptimizerConfig, TrainerConfig
from trainer.distributed import free_port
from trainer.sparsity import SparsityConfig
from trainer.worker import TrainerWorker

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
SEQ = 16


def make_worker(sparsity=None, micro=4, accum=1, steps=20, stage=1) -> TrainerWorker:
    cfg = TrainerConfig(max_steps=steps, seq_len=SEQ, micro_batch_size=micro, grad_accum=accum, zero_stage=stage,
                        device="cpu", seed=0)
    w = TrainerWorker(MODEL, cfg, OptimizerConfig(lr=3e-3, warmup_steps=4, min_lr=3e-4), sparsity)
    w.setup("127.0.0.1", free_port())
    return w


def batch(seed: int, rows: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    # A learnable pattern: each row counts up from a random byte.
    start = rng.integers(0, 200, size=(rows, 1))
    return {"tokens": (start + np.arange(SEQ + 1)[None]) % 256}


def is_2_of_4(w: torch.Tensor) -> bool:
    groups = w.float().reshape(w.shape[0], -1, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def test_train_step_learns_masks_and_publishes():
    w = make_worker(SparsityConfig(method="nm", n=2, m=4))
    first = w.train_step(batch(0))
    for _ in range(14):
        last = w.train_step(batch(0))
    assert last["loss"] < first["loss"] - 0.5
    assert first["lr"] == pytest.approx(3e-3 * 1 / 4)  # warmup step 0 of 4
    assert last["step"] == 15 and last["tokens_per_s"] > 0 and last["sum/tokens"] == 4 * SEQ
    assert last["sparsity/density"] == pytest.approx(0.5)
    state = w.published_state()
    reference = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    assert list(state) == [n for n, _ in reference.named_parameters()]  # tied lm_head appears once
    assert "lm_head.weight" not in state
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    linears = [n for n in state if n.startswith("h.") and n.endswith(".weight") and state[n].dim() == 2]
    assert len(linears) == 8 and all(is_2_of_4(state[n]) for n in linears)
    assert (state["wte.weight"] != 0).float().mean() > 0.99  # embeddings stay dense
    # Eval sees the same masked model: its loss on the training batch matches a train-mode pass.
    assert w.evaluate([batch(0)])["loss"] < first["loss"] - 0.5


def test_published_slice_is_views_and_masks_and_publishes_exactly_the_masked_weights():
    """published_slice copies nothing (views of the parameters, the masks' own ranges); what the
    slice publisher makes of it is bit for bit published_state(), which masks by an fp32
    product (an independent path)."""
    from sync.config import SyncConfig
    from sync.publisher import SlicePublisher
    from sync.receiver import WeightReceiver
    from sync.checksum import state_checksum

    w = make_worker(SparsityConfig(method="nm", n=2, m=4))
    for i in range(3):
        w.train_step(batch(i))
    src = w.published_slice()
    params = dict(w.module.named_parameters())
    for key, t in src.tensors.items():
        p = params[key]
        assert p.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # a view, not a copy
    assert "h.0.mlp.c_fc.weight" in src.masks and "wte.weight" not in src.masks
    assert all(m.dtype == torch.bool for m in src.masks.values())
    pub = SlicePublisher(SyncConfig(mode="sparse"))
    staged = pub.stage(src.tensors, 1, masks=src.masks)
    rec = WeightReceiver()
    payloads = [pub.encode_part(i, 1)[0] for i in range(len(staged.parts))]
    rec.commit(rec.stage_buckets(payloads, kind="snapshot", part_keys=staged.parts))
    assert rec.reread_checksum() == state_checksum(w.published_state())
    assert state_checksum(src.masked()) != state_checksum(src.tensors)  # the masks matter here


def test_grad_accumulation_matches_one_big_batch():
    big = make_worker(micro=4, accum=1)
    accumulated = make_worker(micro=2, accum=2)
    for s in range(3):
        a = big.train_step(batch(s))
        b = accumulated.train_step(batch(s))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    sa, sb = big.published_state("float32"), accumulated.published_state("float32")
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=2e-5, rtol=1e-4)  # weights moved ~1e-2


def test_checkpoint_round_trip_continues_identically(tmp_path):
    sp = SparsityConfig(method="nm", n=2, m=4)
    w = make_worker(sp)
    for s in range(3):
        w.train_step(batch(s))
    extra = ckpt.CheckpointExtra(driver={"rng": random.Random(5).getstate(), "k": {3: (1.5, None)}}, data={"epoch": 1})
    path = committed(w, tmp_path, extra)
    rng_after_save = torch.rand(3)
    later = [w.train_step(batch(s))["loss"] for s in (3, 4)]
    final = w.published_state("float32")

    fresh = make_worker(sp)
    assert fresh.load_checkpoint(str(path)) == extra
    assert fresh.step == 3
    torch.testing.assert_close(torch.rand(3), rng_after_save)  # RNG restored
    resumed = [fresh.train_step(batch(s))["loss"] for s in (3, 4)]
    assert resumed == pytest.approx(later, rel=1e-6)
    for name, value in fresh.published_state("float32").items():
        torch.testing.assert_close(value, final[name], atol=1e-6, rtol=1e-6)


def committed(w: TrainerWorker, root, extra: ckpt.CheckpointExtra | None = None):
    """Save `w` the way the jobs do: a staging directory, then the manifest and the rename."""
    staging = ckpt.new_staging_dir(root, w.step)
    w.save_checkpoint(str(staging), extra)
    return ckpt.commit(staging, root, w.step, {})


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    w = make_worker()
    w.train_step(batch(0))
    path = committed(w, tmp_path)
    rank_file(path, 0).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="rank_00000.safetensors"):
        make_worker().load_checkpoint(str(path))


class _Poison:
    """Unpickling this runs code: it writes `marker` (what an attacker's payload would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _forge_manifest_entry(path, rel):
    """An attacker who can write the directory also rewrites the manifest's size and digest."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][rel] = {"bytes": (path / rel).stat().st_size, "xxh3_128": ckpt.file_digest(path / rel)}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("victim, message", [
    ("ds/mp_rank_00_model_states.pt", "Weights only load failed"),
    ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "Weights only load failed"),
    ("rank_00000.safetensors", "rank_00000.safetensors: cannot read"),
])
def test_poisoned_checkpoint_runs_no_code(tmp_path, victim, message):
    w = make_worker(SparsityConfig(method="nm", n=2, m=4))
    w.train_step(batch(0))
    path = committed(w, tmp_path / "ck")
    assert victim in json.loads((path / "manifest.json").read_text())["files"]
    marker = tmp_path / "marker"
    # The poison is real: an unrestricted torch.load of it runs the payload.
    torch.save({"model": _Poison(tmp_path / "proof")}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert (tmp_path / "proof").exists()
    torch.save({"module": _Poison(marker), "optimizer_state_dict": _Poison(marker)}, path / victim)
    _forge_manifest_entry(path, victim)
    fresh = make_worker(SparsityConfig(method="nm", n=2, m=4))
    with pytest.raises(CheckpointError, match=message):
        fresh.load_checkpoint(str(path))
    assert not marker.exists()
    assert fresh.step == 0


def test_same_size_bit_flip_in_any_file_fails_before_loading(tmp_path):
    w = make_worker(SparsityConfig(method="nm", n=2, m=4))
    w.train_step(batch(0))
    path = committed(w, tmp_path)
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert len(files) >= 3
    fresh = make_worker(SparsityConfig(method="nm", n=2, m=4))
    before = fresh.published_state("float32")
    for rel in files:
        original = (path / rel).read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x10
        (path / rel).write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"{rel} is corrupt"):
            ckpt.validate_checkpoint(path, {})
        with pytest.raises(CheckpointError, match=f"{rel} is corrupt"):
            fresh.load_checkpoint(str(path))
        (path / rel).write_bytes(original)
    assert fresh.step == 0
    for name, value in fresh.published_state("float32").items():  # nothing was loaded
        assert torch.equal(value, before[name])


def test_export_writes_masked_safetensors_and_config(tmp_path):
    from safetensors.torch import load_file

    from models.export import load_gpt_directory

    w = make_worker(SparsityConfig(method="nm", n=2, m=4))
    w.train_step(batch(0))
    w.export(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert state["h.0.mlp.c_fc.weight"].dtype == torch.float32
    assert is_2_of_4(state["h.0.mlp.c_fc.weight"]) and is_2_of_4(state["h.1.attn.c_attn.weight"])
    assert "lm_head.weight" not in state  # tied to wte: stored once
    sparsity = json.loads((tmp_path / "sparsity.json").read_text())
    assert sparsity["method"] == "nm" and "h.0.mlp.c_fc.weight" in sparsity["tensors"]
    # The directory loads back into a GPT that reproduces the trainer's eval loss.
    model = load_gpt_directory(tmp_path)
    assert model.config.n_embd == 64 and model.lm_head.weight is model.wte.weight
    tokens = torch.as_tensor(batch(7)["tokens"])
    logits = model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(w.evaluate([batch(7)])["loss"], rel=1e-4)


@pytest.mark.parametrize("stage, precision, method", [(2, "fp32", "nm"), (0, "bf16", "nm"), (3, "fp32", "dense")])
def test_other_zero_stages_and_bf16_train_and_publish(stage, precision, method):
    cfg = TrainerConfig(max_steps=20, seq_len=SEQ, micro_batch_size=4, zero_stage=stage, precision=precision, device="cpu")
    w = TrainerWorker(MODEL, cfg, OptimizerConfig(lr=3e-3, warmup_steps=4), SparsityConfig(method=method))
    w.setup("127.0.0.1", free_port())
    first = w.train_step(batch(0))["loss"]
    for _ in range(8):
        last = w.train_step(batch(0))["loss"]
    assert last < first - 1.0
    state = w.published_state()
    assert state["h.0.mlp.c_fc.weight"].shape == (256, 64)  # full tensors, also when ZeRO-3 partitions them
    if method == "nm":
        assert is_2_of_4(state["h.0.mlp.c_fc.weight"])
