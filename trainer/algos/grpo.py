"""GRPO (Shao et al., 2024, DeepSeekMath), the whole algorithm in one file.

For each prompt, G completions are sampled; their rewards r_1..r_G give group-relative
advantages A_i = (r_i - mean(r)) / (std(r) + eps) (std unbiased, as in TRL; a group with equal
rewards gives A = 0). Every completion token t of sample i is trained with the clipped ratio

    rho_t = exp(logp_t - old_logp_t)      old = the rollout's logprob (behaviour policy)
    pg_t  = -min(rho_t * A_i, clip(rho_t, 1 - eps, 1 + eps) * A_i)
    kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator, >= 0)
    loss  = mean over all completion tokens of the batch of (pg_t + beta * kl_t)

(token-level mean as in DAPO, so long completions are not down-weighted).
"""
from __future__ import annotations

import torch

from trainer.algos.config import AlgoConfig
from trainer.algos.logprobs import masked_mean, reference_logprobs, token_logprobs

EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True) -> torch.Tensor:
    """[B] rewards, groups of `group_size` consecutive samples (one prompt each) -> [B] advantages."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + EPS)
    return adv.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative estimate of KL(pi || pi_ref) (Schulman's k3)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


class GRPO:
    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.reference: torch.nn.Module | None = None  # frozen policy for the KL term

    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return group_advantages(rewards, group_size, self.cfg.std_normalize)

    def set_reference(self, model: torch.nn.Module) -> None:
        self.reference = model.eval().requires_grad_(False)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        mask = batch["loss_mask"].float()
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], cfg.temperature)
        old = batch["old_logprobs"].float()
        adv = batch["advantages"].float()[:, None]

        ratio = torch.exp(logp - old)
        clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
        pg = -torch.min(ratio * adv, clipped * adv)
        loss_tokens = pg
        metrics: dict[str, float] = {}
        if cfg.kl_coef > 0:
            kl = k3_kl(logp, reference_logprobs(batch, self.reference, cfg.temperature))
            loss_tokens = pg + cfg.kl_coef * kl
            metrics["kl"] = float(masked_mean(kl.detach(), mask))
        loss = masked_mean(loss_tokens, mask)

        with torch.no_grad():
            metrics.update(policy_metrics(logp, old, ratio, mask, cfg.clip_eps, batch.get("current_version")))
            metrics["pg_loss"] = float(masked_mean(pg, mask))
            metrics["loss"] = float(loss)
        return loss, metrics


def policy_metrics(logp, old, ratio, mask, clip_eps, current_version) -> dict[str, float]:
    """Ratio/clip statistics, and the mismatch between the trainer's and the rollout's logprobs
    over rows sampled by the very weights being trained (the same version)."""
    out = {
        "ratio_mean": float(masked_mean(ratio, mask)),
        "clip_frac": float(masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)),
        "entropy_sampled": float(-masked_mean(logp, mask)),
    }
    same = mask if current_version is None else mask * current_version.float()[:, None]
    if same.sum() > 0:
        diff = (logp - old).abs()
        out["logprob_mismatch"] = float(masked_mean(diff, same))
        out["logprob_mismatch_max"] = float((diff * same).max())
    return out
