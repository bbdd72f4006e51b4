"""PPO (Schulman et al., 2017) for a language model: a value head, GAE, the clipped policy loss
(trainer/algos/policy_loss.py) and a clipped value loss, in one file.

The value head is a linear layer on the policy's final hidden states, detached: the trunk is
trained by the policy loss only, the head by its own Adam (`algo.value_lr`). One scalar reward per
completion, given at its last token. Per batch (one optimizer step of the policy):

    V_t        = head(h_t)                     value of the state before completion token t
    A_t, R_t   = GAE(rewards, V, algo.gamma, algo.lam)   (trainer/algos/advantages.py: gae)
    A_t        <- (A_t - mean A) / (std A + eps) over the batch's tokens (algo.std_normalize)
    policy     = clipped policy loss with A_t per token
    value      = `algo.value_epochs` Adam steps on
                 0.5 * mean_t max((V'_t - R_t)^2, (V_t + clip(V'_t - V_t, -c, c) - R_t)^2),
                 c = algo.value_clip, V the values before the update (the first epoch's loss is
                 logged as `value_loss`)

With several data-parallel ranks the head's gradients are averaged over them, so every rank keeps
the same head. Its weights and Adam state travel in trainer checkpoints (state_dict).
"""
from __future__ import annotations

import torch

from trainer.algos.advantages import EPS, gae
from trainer.algos.config import AlgoConfig
from trainer.algos.logprobs import masked_mean, policy_forward
from trainer.algos.policy_loss import clipped_policy_loss


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class PPO:
    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.reference: torch.nn.Module | None = None
        self.value_head: torch.nn.Linear | None = None
        self.value_opt: torch.optim.Optimizer | None = None

    def set_reference(self, model: torch.nn.Module) -> None:
        self.reference = model.eval().requires_grad_(False)

    def _head(self, width: int, device) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
        """The value head and its optimizer, made on first use."""
        if self.value_head is None or self.value_opt is None:
            self.value_head = torch.nn.Linear(width, 1).to(device)
            torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at first: advantages = discounted rewards
            torch.nn.init.zeros_(self.value_head.bias)
            self.value_opt = torch.optim.Adam(self.value_head.parameters(), lr=self.cfg.value_lr)
        elif self.value_head.weight.device != torch.device(device):  # restored on CPU, trained on an accelerator
            self.value_head.to(device)
            for state in self.value_opt.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        state[k] = v.to(device)
        return self.value_head, self.value_opt

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        mask = batch["loss_mask"].float()
        out = policy_forward(model, batch["input_ids"], batch["attention_mask"], cfg.temperature, with_hidden=True)
        assert out.hidden is not None  # with_hidden=True
        features = out.hidden.detach().float()
        head, opt = self._head(features.shape[-1], features.device)
        with torch.no_grad():
            old_values = head(features).squeeze(-1) * mask
            adv, returns = gae(batch["rewards"], old_values, mask, cfg.gamma, cfg.lam)
            if cfg.std_normalize:
                mean = masked_mean(adv, mask)
                std = masked_mean((adv - mean) ** 2, mask).sqrt()
                adv = (adv - mean) / (std + EPS) * mask
        loss, metrics = clipped_policy_loss(out, batch, adv, cfg, self.reference)
        metrics["value_loss"] = self._fit_values(head, opt, features, old_values, returns, mask)
        metrics["value_mean"] = float(masked_mean(old_values, mask))
        return loss, metrics

    def _fit_values(self, head: torch.nn.Linear, opt: torch.optim.Optimizer, features, old_values, returns,
                    mask) -> float:
        """Train the head (when gradients are on); the loss before this batch's first update."""
        first: float | None = None
        with torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad():
            for _ in range(self.cfg.value_epochs if torch.is_grad_enabled() else 1):
                values = head(features).squeeze(-1)
                loss = clipped_value_loss(values, old_values, returns, mask, self.cfg.value_clip)
                first = float(loss.detach()) if first is None else first
                if not torch.is_grad_enabled():
                    break
                opt.zero_grad()
                loss.backward()
                _average_over_ranks(head)
                opt.step()
        assert first is not None  # algo.value_epochs >= 1 (trainer/algos/config.py)
        return first

    def state_dict(self) -> dict:
        if self.value_head is None or self.value_opt is None:
            return {}
        return {"value_head": {k: v.cpu() for k, v in self.value_head.state_dict().items()},
                "value_opt": self.value_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        weight = state["value_head"]["weight"]
        self.value_head = None
        head, opt = self._head(weight.shape[1], "cpu")
        head.load_state_dict(state["value_head"])
        opt.load_state_dict(state["value_opt"])


def _average_over_ranks(module: torch.nn.Module) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
