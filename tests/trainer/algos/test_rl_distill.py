"""Distillation as an auxiliary RL loss (trainer/algos/distill.py): on a tiny HF Llama and a
hand-made RL batch, loss = the algorithm's own policy loss + distill.weight * the SquareHead / KL
term written out here (loops over layers and tokens), gradients included; distill=none is the
algorithm itself."""
import math

import pytest
import torch
from hf_fixtures import save_tiny_llama

from models import ModelConfig, build_model
from trainer.algos import PPO, AlgoConfig, GRPO
from trainer.algos.distill import with_distillation
from trainer.distill import DistillConfig


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "llama", with_tokenizer=False)


def _student(path):
    """The dense starting model, moved off it (as pruning and training would): teacher != student."""
    model, _ = build_model(ModelConfig(kind="hf", path=str(path)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.train()


def _batch(vocab, seed=0):
    """Left-padded prompts, completions, right padding (rollout/batch.py's layout)."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0],
                              [0, 0, 0, 1, 1, 1, 1, 1]])
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0],
                              [0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.float)
    ids = torch.randint(3, vocab, attention.shape, generator=g) * attention + 258 * (1 - attention)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask,
            "old_logprobs": (torch.randn(ids.shape, generator=g) * 0.2 - 5.5) * loss_mask,
            "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2]), "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0])}


def _hand_squarehead(student_hidden, teacher_hidden, attention):
    """sum over decoder layers of MSE(t, s) / MSE(t, 0) over the real tokens, by explicit loops."""
    total = 0.0
    for s_l, t_l in zip(student_hidden[1:], teacher_hidden[1:]):  # [0] is the embeddings
        num = den = 0.0
        count = 0
        for b in range(attention.shape[0]):
            for t in range(attention.shape[1]):
                if attention[b, t]:
                    num += float(((s_l[b, t] - t_l[b, t]) ** 2).sum())
                    den += float((t_l[b, t] ** 2).sum())
                    count += s_l.shape[-1]
        total += (num / count) / (den / count)
    return total


def _hand_kl(student_logits, teacher_logits, loss_mask, T):
    """T^2 * mean over completion tokens t of KL(teacher || student) of the logits at t - 1."""
    terms = []
    for b in range(loss_mask.shape[0]):
        for t in range(1, loss_mask.shape[1]):
            if loss_mask[b, t]:
                p = torch.softmax(teacher_logits[b, t - 1].double() / T, -1)
                log_q = torch.log_softmax(student_logits[b, t - 1].double() / T, -1)
                terms.append(float((p * (p.log() - log_q)).sum()))
    return T * T * sum(terms) / len(terms)


def _algo(name):
    return GRPO(AlgoConfig()) if name == "grpo" else PPO(AlgoConfig(name="ppo"))


@pytest.mark.parametrize("algo_name, distill, weight, temperature", [
    ("grpo", "squarehead", 0.5, 1.0), ("grpo", "kl", 2.0, 2.0), ("ppo", "squarehead", 1.0, 1.0),
])
def test_rl_loss_is_policy_loss_plus_weight_times_the_distill_term(llama, algo_name, distill, weight, temperature):
    torch.manual_seed(0)
    model_cfg = ModelConfig(kind="hf", path=str(llama))
    student = _student(llama)
    batch = _batch(student.config.vocab_size)
    cfg = DistillConfig(name=distill, weight=weight, temperature=temperature, teacher_dtype="float32")

    # Independently: the algorithm alone, the teacher (the saved dense model) and the term by hand.
    policy_loss, policy_metrics = _algo(algo_name)(student, batch)
    policy_grads = torch.autograd.grad(policy_loss, list(student.parameters()), allow_unused=True)
    teacher, _ = build_model(model_cfg)
    teacher.eval()
    with torch.no_grad():
        t_out = teacher(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        s_out = student(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    if distill == "squarehead":
        hand = _hand_squarehead(s_out.hidden_states, t_out.hidden_states, batch["attention_mask"])
    else:
        hand = _hand_kl(s_out.logits, t_out.logits, batch["loss_mask"], temperature)
    assert hand > 1e-4  # the student really differs from its teacher

    objective = with_distillation(_algo(algo_name), cfg, model_cfg)
    loss, metrics = objective(student, batch)
    assert loss.item() == pytest.approx(policy_loss.item() + weight * hand, rel=1e-4 if distill == "kl" else 1e-5,
                                        abs=1e-6)
    # float32 KL sums p * (log p - log q) over the vocabulary: terms of size ~ln V ~ 6 cancel
    # down to a KL of ~0.03, so the float32 result carries ~1e-7 * 6 / 0.03 ~ 2e-5 relative error
    # against the float64 hand value (squarehead has no such cancellation).
    assert metrics[f"distill/{distill}"] == pytest.approx(hand, rel=1e-4 if distill == "kl" else 1e-5)
    assert metrics["loss"] == pytest.approx(policy_metrics["loss"], rel=1e-6)  # `loss` stays the policy loss
    assert metrics["distill/total_loss"] == pytest.approx(loss.item(), rel=1e-6)

    # The term trains the student: grad(loss) - grad(policy loss) = weight * grad(term), the
    # term's gradient taken here from a separate forward through squarehead / KL as written above.
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    out = student(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    if distill == "squarehead":
        tokens = batch["attention_mask"].bool()
        term = sum(((s[tokens] - t[tokens]) ** 2).mean() / (t[tokens] ** 2).mean()
                   for s, t in zip(out.hidden_states[1:], t_out.hidden_states[1:]))
    else:
        rows = batch["loss_mask"][:, 1:].bool()
        log_p = torch.log_softmax(t_out.logits[:, :-1][rows] / temperature, -1)
        log_q = torch.log_softmax(out.logits[:, :-1][rows] / temperature, -1)
        term = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    term_grads = torch.autograd.grad(term, list(student.parameters()), allow_unused=True)
    name_of = {id(p): n for n, p in student.named_parameters()}
    for p, g, g0, gt in zip(student.parameters(), grads, policy_grads, term_grads):
        if gt is None:
            continue
        g0 = torch.zeros_like(gt) if g0 is None else g0
        torch.testing.assert_close(g - g0, weight * gt, rtol=1e-4, atol=1e-7, msg=name_of[id(p)])
    assert any(gt is not None and gt.abs().max() > 0 for gt in term_grads)


def test_distill_none_is_the_algorithm_itself_and_eval_mode_is_the_policy_loss(llama):
    model_cfg = ModelConfig(kind="hf", path=str(llama))
    algo = GRPO(AlgoConfig())
    assert with_distillation(algo, DistillConfig(), model_cfg) is algo
    assert with_distillation(algo, None, model_cfg) is algo
    student = _student(llama).eval()
    batch = _batch(student.config.vocab_size)
    wrapped = with_distillation(GRPO(AlgoConfig()), DistillConfig(name="squarehead"), model_cfg)
    with torch.no_grad():
        loss, metrics = wrapped(student, batch)
        plain, _ = algo(student, batch)
    assert float(loss) == float(plain) and not any(k.startswith("distill/") for k in metrics)
    assert wrapped.teacher is None  # not even loaded
    assert math.isfinite(float(loss))
