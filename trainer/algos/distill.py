"""Distillation as an auxiliary RL loss (`distill=squarehead|kl` in the RL job): keeps a policy
that RL fine-tunes from a pruned / sparse start close to its dense origin.

    loss = policy_loss + distill.weight * distill_term

- policy_loss: the algorithm's own loss (GRPO, ema_baseline, PPO: trainer/algos/policy_loss.py),
  unchanged; its metrics are kept as they are (`loss` stays the policy loss).
- distill_term, on the RL training batch's tokens, teacher = the frozen dense starting model
  (trainer/distill.py's `load_teacher`: model.path, or distill.teacher_path):
    squarehead  sum over decoder layers of MSE(h_teacher, h_student) / MSE(h_teacher, 0)
                (trainer/distill.py's `squarehead_loss`) over every prompt and completion token
                (attention_mask == 1; padding excluded)
    kl          T^2 KL(teacher || student) at distill.temperature per completion token
                (trainer/distill.py's `kl_distill_loss`; the logits that predict the tokens with
                loss_mask == 1)

The student's outputs are those of the algorithm's own forward pass of the batch, observed with a
forward hook (for squarehead the same call also asks for `output_hidden_states`): no second
student forward. The teacher runs once per batch without gradient. `distill=none` builds no
wrapper at all (`with_distillation` returns the algorithm itself).
"""
from __future__ import annotations

import torch

from trainer.distill import DistillConfig, kl_distill_loss, load_teacher, squarehead_loss


def distill_term(cfg: DistillConfig, student_out, teacher_out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The distillation term of one RL batch from the student's and the teacher's model outputs
    (`logits` [B, T, V], and for squarehead `hidden_states`, embeddings first)."""
    if cfg.name == "squarehead":
        tokens = batch["attention_mask"].bool()  # prompt and completion, not padding
        return squarehead_loss([h[tokens] for h in student_out.hidden_states[1:]],
                               [h[tokens] for h in teacher_out.hidden_states[1:]])
    if cfg.name == "kl":
        predicts = batch["loss_mask"][:, 1:].bool()  # logits at t - 1 predict completion token t
        student = student_out.logits[:, :-1][predicts]
        if student.shape[0] == 0:
            return student_out.logits.float().sum() * 0.0
        return kl_distill_loss(student, teacher_out.logits[:, :-1][predicts], cfg.temperature)
    raise ValueError(f"distill.name={cfg.name!r} has no RL distillation term")


class PolicyDistillation:
    """An RL objective (trainer/algos/ protocol) plus `distill.weight` times the distillation
    term. Delegates the algorithm's reference policy and checkpoint state."""

    def __init__(self, algo, cfg: DistillConfig, model_cfg):
        self.algo, self.cfg, self.model_cfg = algo, cfg, model_cfg
        self.teacher: torch.nn.Module | None = None  # loaded on the trainer rank at the first call

    def set_reference(self, model: torch.nn.Module) -> None:
        self.algo.set_reference(model)

    def state_dict(self) -> dict:
        return self.algo.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.algo.load_state_dict(state)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        if not model.training:
            return self.algo(model, batch)
        features = self.cfg.name == "squarehead"
        inner = getattr(model, "module", model)  # a DeepSpeed engine calls its module
        captured: list = []
        hooks = [inner.register_forward_hook(lambda _m, _args, out: captured.append(out))]
        if features:
            hooks.append(inner.register_forward_pre_hook(
                lambda _m, args, kwargs: (args, {**kwargs, "output_hidden_states": True}), with_kwargs=True))
        try:
            policy_loss, metrics = self.algo(model, batch)
        finally:
            for h in hooks:
                h.remove()
        if len(captured) != 1:
            raise RuntimeError(f"distill={self.cfg.name}: expected one policy forward per batch, saw {len(captured)}")
        if self.teacher is None:
            self.teacher = load_teacher(self.cfg, self.model_cfg, captured[0].logits.device)
        with torch.no_grad():
            kwargs = {"output_hidden_states": True} if features else {}
            teacher_out = self.teacher(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        term = distill_term(self.cfg, captured[0], teacher_out, batch)
        loss = policy_loss + self.cfg.weight * term
        metrics = {**metrics, f"distill/{self.cfg.name}": float(term.detach()), "distill/total_loss": float(loss.detach())}
        return loss, metrics


def with_distillation(algo, cfg: DistillConfig | None, model_cfg):
    """`algo` itself for distill=none (or no config), else `algo` plus the distillation term."""
    if cfg is None or cfg.name == "none":
        return algo
    return PolicyDistillation(algo, cfg, model_cfg)
