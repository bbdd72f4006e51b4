"""HF models through trainer/sparsity (2:4 SR-STE) and out through models/export.py: a few
training steps on Llama-style (GQA), GPT-2 style (Conv1D, tied) and Qwen2-style (GQA and tied)
models, then the exported
directory loads in transformers with every sparsified weight exactly 2:4 along its input axis."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import ModelConfig, build_model, default_sparsity_targets
from models.export import export_hf_directory
from models.hf import load_hf_skeleton
from trainer.sparsity import SparsityConfig, TorchParamAccess, build_sparsifier, module_shapes, validate_sparsity_config

INPUT_AXIS = {"LlamaForCausalLM": 1, "Qwen2ForCausalLM": 1, "GPT2LMHeadModel": 0}  # nn.Linear [out, in]; Conv1D [in, out]


def test_sr_ste_2_4_training_then_export(hf_dir, tmp_path):
    cfg = ModelConfig(kind="hf", path=str(hf_dir))
    skeleton, _ = load_hf_skeleton(cfg)
    scfg = SparsityConfig(method="nm", n=2, m=4, estimator="sr_ste", include=default_sparsity_targets(skeleton))
    validate_sparsity_config(scfg, module_shapes(skeleton))  # what a driver does before actors start

    model, tok = build_model(cfg)
    model.train()
    sparsifier = build_sparsifier(model, scfg, total_steps=3)
    sparsifier.attach()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, tok.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        sparsifier.set_step_context(1e-2, 1e-2, 1)  # the step's lr: decoupled SR-STE decays by it
        sparsifier.before_forward(step)
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.after_optimizer_step(step, TorchParamAccess(model))
    state = sparsifier.masked_state_dict({n: p.detach() for n, p in model.named_parameters()})
    out = export_hf_directory(model, hf_dir, tmp_path / "out", state=state, sparsity_info=sparsifier.sparsified)

    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    axis = INPUT_AXIS[type(loaded).__name__]
    tensors = json.loads((out / "sparsity.json").read_text())["tensors"]
    n_layers = loaded.config.num_hidden_layers
    assert len(tensors) == n_layers * (7 if axis == 1 else 4)
    got = dict(loaded.named_parameters())
    for name, claim in tensors.items():
        assert claim["pattern"] == "2:4" and claim["dim"] == axis
        groups = (got[name] != 0).movedim(axis, -1).reshape(-1, 4).sum(-1)
        assert int(groups.max()) <= 2, name
    for name, t in state.items():
        assert torch.equal(got[name], t), name
    tied = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert tied == bool(loaded.config.tie_word_embeddings)
    dense = [n for n in got if n not in tensors]
    assert any("embed" in n or "wte" in n for n in dense) and not any("norm" in n or "ln_" in n for n in tensors)
    gen = loaded.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), do_sample=False,
                          max_new_tokens=4, pad_token_id=tok.pad_id)
    assert gen.shape[1] >= 5
