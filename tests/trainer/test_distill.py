"""Distillation for sparse fine-tuning (trainer/distill.py): SquareHead and KL against hand
computations, the objective's combination, and the config checks that run before any actor."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_fixtures import save_tiny_gpt2, save_tiny_llama

from models import ModelConfig, build_model
from trainer.distill import (DistillConfig, DistillConfigError, DistillationObjective, kl_distill_loss,
                             squarehead_loss, validate_distill_config)


def test_squarehead_on_hand_computed_tensors():
    t1 = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    s1 = torch.tensor([[0.0, -2.0], [1.0, 1.0]])
    t2 = torch.tensor([[2.0, 2.0]])
    s2 = torch.tensor([[1.0, 4.0]])
    # layer 1: MSE(t, s) = (1 + 0 + 4 + 1) / 4 = 1.5; MSE(t, 0) = (1 + 4 + 9 + 0) / 4 = 3.5
    # layer 2: MSE = (1 + 4) / 2 = 2.5; MSE(t, 0) = (4 + 4) / 2 = 4
    expected = 1.5 / 3.5 + 2.5 / 4.0
    assert float(squarehead_loss([s1, s2], [t1, t2])) == pytest.approx(expected)
    assert float(squarehead_loss([t1, t2], [t1, t2])) == 0.0
    # invariant to the teacher's per-layer scale when the student errs in proportion
    assert float(squarehead_loss([10 * s1], [10 * t1])) == pytest.approx(1.5 / 3.5)


def test_kl_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    T = 2.0
    p = F.softmax(t / T, -1)
    kl = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert float(kl_distill_loss(s, t, T)) == pytest.approx(float(kl), rel=1e-5)


def test_objective_is_ce_plus_weighted_squarehead_and_teacher_is_the_dense_start(tmp_path):
    path = save_tiny_llama(tmp_path / "llama", with_tokenizer=False)
    model_cfg = ModelConfig(kind="hf", path=str(path))
    student, _ = build_model(model_cfg)
    student.train()
    with torch.no_grad():  # the student drifted from the dense start
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    obj = DistillationObjective(DistillConfig(name="squarehead", weight=0.7, task_weight=1.3, teacher_dtype="float32"),
                                model_cfg)
    tokens = torch.randint(0, 200, (2, 9))
    loss, metrics = obj(student, {"tokens": tokens})
    teacher, _ = build_model(model_cfg)  # the dense start, loaded independently
    with torch.no_grad():
        t_hs = teacher(tokens[:, :-1], output_hidden_states=True).hidden_states[1:]
    out = student(tokens[:, :-1], output_hidden_states=True)
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), tokens[:, 1:].reshape(-1))
    sq = sum(((s - t) ** 2).mean() / (t ** 2).mean() for s, t in zip(out.hidden_states[1:], t_hs))
    assert float(loss.detach()) == pytest.approx(float((1.3 * ce + 0.7 * sq).detach()), rel=1e-4)
    assert metrics["loss"] == pytest.approx(float(ce.detach()), rel=1e-4)
    assert len(t_hs) == teacher.config.num_hidden_layers
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    import pickle
    assert pickle.loads(pickle.dumps(obj)).teacher is None  # Ray ships it without the teacher
    student.eval()  # eval: the task loss only, comparable with runs without distillation
    with torch.no_grad():
        eval_loss, _ = obj(student, {"tokens": tokens})
        want = F.cross_entropy(student(tokens[:, :-1]).logits.reshape(-1, out.logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert float(eval_loss) == pytest.approx(float(want), rel=1e-5)


def test_bad_distill_configs_name_the_key(tmp_path):
    llama = save_tiny_llama(tmp_path / "llama", with_tokenizer=False)
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2", with_tokenizer=False)
    hf = ModelConfig(kind="hf", path=str(llama))
    with torch.device("meta"):
        skeleton, _ = build_model(hf)
        gpt, _ = build_model(ModelConfig(kind="gpt"))
    with pytest.raises(DistillConfigError, match="distill.teacher_path"):
        validate_distill_config(DistillConfig(name="squarehead", teacher_path=str(gpt2)), hf, skeleton)
    with pytest.raises(DistillConfigError, match="hidden states"):
        validate_distill_config(DistillConfig(name="squarehead"), hf, gpt)
    with pytest.raises(DistillConfigError, match="model.kind='gpt'"):
        validate_distill_config(DistillConfig(name="squarehead"), ModelConfig(kind="gpt"), gpt)
    with pytest.raises(DistillConfigError, match="distill.weight"):
        validate_distill_config(DistillConfig(name="kl", weight=-1.0), hf, skeleton)
    with pytest.raises(DistillConfigError, match="distill.name"):
        validate_distill_config(DistillConfig(name="square"), hf, skeleton)
    validate_distill_config(DistillConfig(name="squarehead", teacher_path=str(llama)), hf, skeleton)
