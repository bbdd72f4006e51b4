"""PPO-style clipped policy gradient with a reward baseline (no value network), in one file.

One scalar reward per completion; the advantage of sample i is A_i = r_i - b, with b an
exponential moving average of past batch-mean rewards (b_0 = the first batch's mean), optionally
divided by the batch's std. Each completion token is trained with PPO's clipped surrogate

    rho_t = exp(logp_t - old_logp_t)
    loss  = mean over completion tokens of -min(rho_t * A_i, clip(rho_t, 1 - eps, 1 + eps) * A_i)
            (+ beta * k3 KL to the reference policy, as in GRPO)
"""
from __future__ import annotations

import torch

from trainer.algos.config import AlgoConfig
from trainer.algos.grpo import k3_kl, policy_metrics
from trainer.algos.logprobs import masked_mean, reference_logprobs, token_logprobs

EPS = 1e-4


def baseline_advantages(rewards: torch.Tensor, baseline: float, std_normalize: bool = True) -> torch.Tensor:
    adv = rewards.float() - baseline
    if std_normalize and rewards.numel() > 1:
        adv = adv / (rewards.float().std() + EPS)
    return adv


class PPO:
    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.baseline: float | None = None
        self.reference: torch.nn.Module | None = None

    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """Advantages against the baseline so far, then the baseline moves toward this batch."""
        mean = float(rewards.float().mean())
        if self.baseline is None:
            self.baseline = mean
        adv = baseline_advantages(rewards, self.baseline, self.cfg.std_normalize)
        self.baseline = self.cfg.baseline_decay * self.baseline + (1 - self.cfg.baseline_decay) * mean
        return adv

    def set_reference(self, model: torch.nn.Module) -> None:
        self.reference = model.eval().requires_grad_(False)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        mask = batch["loss_mask"].float()
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], cfg.temperature)
        old = batch["old_logprobs"].float()
        adv = batch["advantages"].float()[:, None]

        ratio = torch.exp(logp - old)
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
        loss_tokens = -surrogate
        metrics: dict[str, float] = {}
        if cfg.kl_coef > 0:
            kl = k3_kl(logp, reference_logprobs(batch, self.reference, cfg.temperature))
            loss_tokens = loss_tokens + cfg.kl_coef * kl
            metrics["kl"] = float(masked_mean(kl.detach(), mask))
        loss = masked_mean(loss_tokens, mask)
        with torch.no_grad():
            metrics.update(policy_metrics(logp, old, ratio, mask, cfg.clip_eps, batch.get("current_version")))
            metrics["pg_loss"] = float(masked_mean(-surrogate, mask))
            metrics["loss"] = float(loss)
        return loss, metrics
