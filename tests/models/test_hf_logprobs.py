"""The trainer and a rollout worker agree on the logprobs of the same tokens, for an HF model.

Trainer side: a TrainerWorker (DeepSpeed, world size 1) holding fp32 masters of a tiny Llama-style
model under 2:4 SR-STE, after one training step; its logprobs are recomputed exactly as the GRPO
objective does (trainer/algos/logprobs.py: token_logprobs on the engine). Rollout side: a
RolloutWorker whose bf16 engine received the trainer's published version through the sync
codec (checksum equal to the publisher's); its logprobs come from sampling with the KV cache.
Only numerics (bf16 vs fp32, cached vs full forward) separate the two.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import ModelConfig
from rollout.batch import completion_columns, sequence_layout
from rollout.config import RolloutConfig
from rollout.tasks import TaskConfig
from rollout.worker import RolloutWorker
from sync.codec import encode
from sync.checksum import state_checksum
from trainer.algos.logprobs import token_logprobs
from trainer.config import OptimizerConfig, TrainerConfig
from trainer.distributed import free_port
from trainer.sparsity import SparsityConfig
from trainer.worker import TrainerWorker

MAX_ABS_TOLERANCE = 0.05  # bf16 policy copy vs fp32 masters, per token (nats)
MEAN_ABS_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def trainer_and_rollout(llama_dir):
    model_cfg = ModelConfig(kind="hf", path=str(llama_dir))
    trainer = TrainerWorker(model_cfg, TrainerConfig(device="cpu", zero_stage=0, micro_batch_size=4, max_steps=4, seq_len=16),
                            OptimizerConfig(lr=1e-3, warmup_steps=0), SparsityConfig(method="nm", n=2, m=4))
    trainer.setup("127.0.0.1", free_port())
    tokens = np.random.default_rng(0).integers(3, trainer.tokenizer.vocab_size, (4, 17))
    trainer.train_step({"tokens": tokens})  # masters move off their initial values; masks applied
    published = trainer.published_state("bfloat16")

    rollout = RolloutWorker(0, model_cfg, RolloutConfig(workers=1, prompts_per_step=8, samples_per_prompt=4,
                                                        max_new_tokens=12, temperature=0.9),
                            TaskConfig(name="reverse", length=6))
    receiver = rollout.slot.receiver
    receiver.commit(receiver.stage_buckets([encode(None, published, base_version=None, target_version=1, level="fast")],
                                           kind="snapshot"))
    yield trainer, rollout, published
    trainer.shutdown()


def test_rollout_worker_holds_the_published_version_bit_for_bit(trainer_and_rollout):
    _, rollout, published = trainer_and_rollout
    assert rollout.version() == 1
    assert rollout.state_checksum() == state_checksum(published)
    weights = rollout.weights()
    assert sorted(weights) == sorted(published)
    for name, t in published.items():
        assert torch.equal(weights[name].view(torch.int16), t.view(torch.int16)), name


def test_trainer_and_rollout_logprobs_of_the_same_tokens_agree(trainer_and_rollout):
    trainer, rollout, _ = trainer_and_rollout
    temperature = rollout.cfg.temperature
    result = rollout.generate(8, 4)
    batch = sequence_layout(result.prompt_ids, result.tokens, result.lengths, rollout.tokenizer.pad_id)
    rollout_logp = completion_columns(batch["input_ids"].shape[1], result.logprobs)
    mask = batch["loss_mask"]
    assert mask.sum() >= 32  # enough sampled tokens to compare

    trainer.engine.eval()
    with torch.no_grad():  # what GRPO computes for `logp` (trainer/algos/grpo.py), from the fp32 masters
        trainer_logp = token_logprobs(trainer.engine, batch["input_ids"], batch["attention_mask"], temperature)
    diff = (trainer_logp - rollout_logp).abs()[mask.bool()]
    print(f"\nHF Llama-style 2:4, {int(mask.sum())} tokens: trainer (fp32) vs rollout (bf16) logprob "
          f"max abs diff {float(diff.max()):.5f}, mean {float(diff.mean()):.5f}")
    assert float(diff.max()) < MAX_ABS_TOLERANCE
    assert float(diff.mean()) < MEAN_ABS_TOLERANCE
    # Not vacuous: the sampled tokens have real, non-degenerate probabilities.
    picked = trainer_logp[mask.bool()]
    assert float(picked.min()) < -1.0 and bool((picked < 0).all())


def test_rollout_prompts_go_through_the_chat_template(trainer_and_rollout):
    _, rollout, _ = trainer_and_rollout
    result = rollout.generate(2, 1)
    text = result.prompts[0]
    # hf_fixtures' ChatML-like template, written out by hand.
    expected = rollout.tokenizer.hf.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                                          add_special_tokens=False)
    assert result.prompt_ids[0] == expected


def test_bf16_rollout_engine_keeps_rotary_frequencies_of_the_fp32_trainer(trainer_and_rollout):
    """A bf16-rounded RoPE inv_freq shifts rotary angles by up to ~2^-9 * position rad (0.3 rad at
    position 256 for head_dim 128): invisible on a random tiny model, large on a real one."""
    trainer, rollout, _ = trainer_and_rollout
    engine_freq = rollout.engine.model.model.rotary_emb.inv_freq
    trainer_freq = trainer.module.model.rotary_emb.inv_freq
    assert trainer_freq.dtype == torch.float32
    assert engine_freq.dtype == torch.float32 and torch.equal(engine_freq, trainer_freq)
    assert rollout.engine.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
