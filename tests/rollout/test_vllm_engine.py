"""rollout.engine=vllm: a RolloutWorker generating with vLLM (in this process, no actor) and
receiving snapshots and sparse deltas through its WeightReceiver.

The reference for what the engine computes is independent of it: the Hugging Face model of the
same family, holding the published bf16 weights, scoring the engine's sampled tokens by teacher
forcing (trainer/algos/logprobs.py policy_forward, as the trainer does). Tolerance: both sides run
bf16 weights with activations rounded to bf16 (relative error 2^-8 per op) through a 2-layer
model whose logprobs are ~ln(1/259) ~ -5.6, so per-token differences of a few 1e-2 are
arithmetic; a missed update (the check below skips one on purpose) moves them by ~1.
"""
from __future__ import annotations

import pytest
import torch

from hf_fixtures import save_tiny_gpt2, save_tiny_llama, save_tiny_qwen2

vllm = pytest.importorskip("vllm")

pytestmark = pytest.mark.ray

# head sizes vLLM's CPU attention supports (32 here; the fixtures' default 16 is not)
FAMILIES = {
    "llama": lambda d: save_tiny_llama(d, with_tokenizer=False, num_attention_heads=2, num_key_value_heads=1),
    "qwen2": lambda d: save_tiny_qwen2(d, with_tokenizer=False, num_attention_heads=2, num_key_value_heads=1),
    "gpt2": lambda d: save_tiny_gpt2(d, with_tokenizer=False, n_head=2),
}
TOL = 0.03  # mean |engine - reference| logprob per token; see the module docstring


def _cfgs(path, **rollout):
    from models import ModelConfig
    from rollout.config import RolloutConfig, VLLMConfig
    from rollout.tasks import TaskConfig

    mc = ModelConfig(kind="hf", path=str(path))
    rc = RolloutConfig(engine="vllm", max_new_tokens=8, vllm=VLLMConfig(kv_cache_memory_bytes=64 << 20), **rollout)
    return mc, rc, TaskConfig(name="reverse", length=3)


@pytest.fixture
def closing():
    """Engines built in this process are shut down after the test (vLLM keeps global state)."""
    engines = []
    yield engines.append
    for e in engines:
        e.close()


def _redrawn(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """New random values at the tensor's own scale: a different function, not a degenerate one
    (much larger weights would make every distribution one-hot, and any two models agree on it)."""
    return (torch.randn(t.shape, generator=g) * t.float().std() + t.float().mean()).to(t.dtype)


def _published(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()}


def _reference_logprob_diff(mc, published: dict[str, torch.Tensor], batch) -> float:
    """Mean |engine logprob - the HF model's logprob (published weights) of the same token|."""
    from models import build_model
    from rollout.batch import completion_columns, sequence_layout
    from trainer.algos.logprobs import masked_mean, policy_forward

    model, tok = build_model(mc)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in published.items()}, strict=False)
    assert not unexpected and all(model.get_parameter(k) is not None for k in published)
    with torch.no_grad():
        tb = sequence_layout(batch.prompt_ids, batch.tokens, batch.lengths, tok.pad_id)
        ref = policy_forward(model.eval(), tb["input_ids"], tb["attention_mask"]).logp
    engine = completion_columns(tb["input_ids"].shape[1], batch.logprobs)
    return float(masked_mean((ref - engine).abs(), tb["loss_mask"]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vllm_worker_follows_snapshots_and_deltas_exactly(family, ray_cluster, tmp_path, closing):
    from models import build_model
    from rollout.worker import RolloutWorker
    from sync.config import SyncConfig
    from sync.checksum import state_checksum
    from sync.transport import WeightPublisher

    mc, rc, tc = _cfgs(FAMILIES[family](tmp_path / family))
    torch.manual_seed(0)
    trainer_model, _ = build_model(mc)
    pub = WeightPublisher(SyncConfig(mode="sparse"))
    g = torch.Generator().manual_seed(1)
    # every tensor redrawn: vLLM started from the checkpoint's own weights, the snapshot must replace them
    v1 = {k: _redrawn(v, g) for k, v in _published(trainer_model).items()}
    pub.publish(v1, 1)
    worker = RolloutWorker(0, mc, rc, tc)
    closing(worker.engine)
    stats = worker.apply_update(pub.update_for(None))
    assert stats.kind == "snapshot" and stats.checksum == state_checksum(v1)
    batch = worker.generate(4, 4)
    assert batch.tokens.shape == (16, 8) and bool((batch.lengths >= 1).all())
    assert _reference_logprob_diff(mc, v1, batch) < TOL

    # A delta that moves a few tensors far (one attention projection, the embedding / lm head,
    # a norm) and leaves the rest: only the changed tensors are handed to the engine.
    names = list(v1)
    moved = [n for n in names if "embed" in n or "wte" in n or "lm_head" in n][:1]
    moved += [n for n in names if any(p in n for p in ("q_proj", "c_attn"))][:1]
    moved += [n for n in names if "norm" in n or "ln_" in n][:1]
    assert len(moved) == 3, names
    v2 = {k: v.clone() for k, v in v1.items()}
    for n in moved:
        v2[n] = _redrawn(v2[n], g)
    pub.publish(v2, 2)
    stats = worker.apply_update(pub.update_for(1))
    assert stats.kind == "delta" and stats.version == 2 and stats.checksum == state_checksum(v2)
    check = worker.verify_weights()  # re-read, not cached; and the engine's side against it
    assert (check.version, check.checksum) == (2, state_checksum(v2)) and check.engine_logprob_diff < TOL
    batch = worker.generate(4, 4)
    assert batch.version == 2 and _reference_logprob_diff(mc, v2, batch) < TOL

    # The check can fail: the same kind of delta committed without handing it to the engine.
    v3 = {k: v.clone() for k, v in v2.items()}
    for n in moved:
        v3[n] = _redrawn(v3[n], g)
    pub.publish(v3, 3)
    worker.engine.load_weights = lambda names: None
    worker.apply_update(pub.update_for(2))
    check = worker.verify_weights()
    assert (check.version, check.checksum) == (3, state_checksum(v3))  # the receiver's copy is right...
    assert check.engine_logprob_diff > 0.05  # ...the engine is not: the weight check says so,
    batch = worker.generate(4, 4)
    assert _reference_logprob_diff(mc, v3, batch) > 0.05  # and so does the trainer-side parity


def test_an_engine_that_fails_to_load_an_update_stops_the_worker(ray_cluster, tmp_path, closing):
    from models import build_model
    from rollout.engine import EngineUpdateError
    from rollout.worker import RolloutWorker
    from sync.config import SyncConfig
    from sync.transport import WeightPublisher

    mc, rc, tc = _cfgs(FAMILIES["llama"](tmp_path / "llama"))
    model, _ = build_model(mc)
    pub = WeightPublisher(SyncConfig(mode="sparse"))
    v1 = _published(model)
    pub.publish(v1, 1)
    worker = RolloutWorker(0, mc, rc, tc)
    closing(worker.engine)
    worker.apply_update(pub.update_for(None))
    v2 = {k: v.clone() for k, v in v1.items()}
    v2["model.norm.weight"] += 1

    def broken(names):
        raise RuntimeError("injected reload failure")

    worker.engine.load_weights = broken
    pub.publish(v2, 2)
    with pytest.raises(EngineUpdateError, match="injected reload failure"):
        worker.apply_update(pub.update_for(1))
    with pytest.raises(EngineUpdateError, match="rebuilt from a snapshot"):
        worker.generate(1, 1)
    with pytest.raises(EngineUpdateError):  # nor does it pass a weight check
        worker.verify_weights()


def test_vllm_bad_input_gets_named_errors(tmp_path, monkeypatch):
    from models import ModelConfig
    from rollout.config import RolloutConfig, RolloutConfigError, VLLMConfig, validate_rollout_config
    from rollout.engine import EngineStartError
    from rollout.vllm_engine import VLLMEngine

    path = FAMILIES["llama"](tmp_path / "llama")
    with pytest.raises(EngineStartError, match="model=hf"):
        VLLMEngine(ModelConfig(), RolloutConfig(engine="vllm"), 0)
    tiny_kv = RolloutConfig(engine="vllm", vllm=VLLMConfig(kv_cache_memory_bytes=4096))
    with pytest.raises(EngineStartError, match="rollout.vllm.gpu_memory_utilization"):
        VLLMEngine(ModelConfig(kind="hf", path=str(path)), tiny_kv, 0)
    with pytest.raises(RolloutConfigError, match="rollout.top_p"):
        validate_rollout_config(RolloutConfig(engine="vllm", top_p=0.9))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(RolloutConfigError, match="scripts/setup.sh"):
        validate_rollout_config(RolloutConfig(engine="vllm"))
