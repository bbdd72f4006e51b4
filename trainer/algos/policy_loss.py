"""The clipped policy loss every RL algorithm here trains with (GRPO, PPO, ema_baseline); they
differ only in how the advantages are estimated (trainer/algos/advantages.py).

For completion token t with advantage A_t (one per row, or one per token):

    rho_t = exp(logp_t - old_logp_t)      old = the rollout's logprob (behaviour policy)
    pg_t  = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)
    kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator, >= 0)
    loss  = mean over the completion tokens of the micro-batch of (pg_t + beta * kl_t)

(a token-level mean as in DAPO, so long completions are not down-weighted). The mean is taken per
micro-batch; the step's gradient is the average of the micro-batches' (over trainer.grad_accum
and the data-parallel ranks), which equals DAPO's mean over all tokens of the batch only when
every micro-batch holds the same number of completion tokens.

With algo.tis_cap = C > 0 (truncated importance sampling, as veRL's TIS), rows sampled by the
weights being trained (`current_version`) separate the engine/trainer mismatch from the policy
ratio: old_logp there is the trainer's own logprob (detached, the same weights), and the token's
loss is weighted by w_t = min(exp(trainer_logp_t - engine_logp_t), C); older rows keep the rule
above (w_t = 1).
"""
from __future__ import annotations

import torch

from trainer.algos.config import AlgoConfig
from trainer.algos.logprobs import PolicyOutput, masked_mean, policy_forward, reference_logprobs


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative estimate of KL(pi || pi_ref) (Schulman's k3)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_policy_loss(out: PolicyOutput, batch: dict[str, torch.Tensor], advantages: torch.Tensor,
                        cfg: AlgoConfig, reference: torch.nn.Module | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss above for `advantages` [B] or [B, T], and its metrics (see policy_metrics)."""
    mask = batch["loss_mask"].float()
    logp, old = out.logp, batch["old_logprobs"].float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None]
    metrics: dict[str, float] = {}
    behaviour, tis = old, None
    if cfg.tis_cap:
        current = batch.get("current_version")
        current = torch.ones(logp.shape[0], dtype=torch.bool) if current is None else current.bool()
        current = current.to(logp.device)[:, None]
        trainer_logp = logp.detach()
        behaviour = torch.where(current, trainer_logp, old)
        tis = torch.where(current, torch.exp(trainer_logp - old).clamp(max=cfg.tis_cap), torch.ones_like(old))
        metrics["tis_weight_mean"] = float(masked_mean(tis, mask))
        metrics["tis_capped_frac"] = float(masked_mean((tis >= cfg.tis_cap).float(), mask))
    ratio = torch.exp(logp - behaviour)
    pg = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
    if tis is not None:
        pg = pg * tis
    loss_tokens = pg
    if cfg.kl_coef > 0:
        kl = k3_kl(logp, reference_logprobs(batch, reference, cfg.temperature))
        loss_tokens = pg + cfg.kl_coef * kl
        metrics["kl"] = float(masked_mean(kl.detach(), mask))
    loss = masked_mean(loss_tokens, mask)
    with torch.no_grad():
        metrics.update(policy_metrics(out, old, ratio, mask, cfg.clip_eps, batch.get("current_version")))
        metrics["pg_loss"] = float(masked_mean(pg, mask))
        metrics["loss"] = float(loss)
    return loss, metrics


def policy_metrics(out: PolicyOutput, old, ratio, mask, clip_eps, current_version) -> dict[str, float]:
    """Ratio/clip statistics, the policy's entropy, the approximate KL to the behaviour policy
    (k3 of old vs new), and the mismatch between the trainer's and the rollout's logprobs over
    rows sampled by the very weights being trained (the same version)."""
    logp = out.logp
    out_metrics = {
        "ratio_mean": float(masked_mean(ratio, mask)),
        "clip_frac": float(masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)),
        "approx_kl": float(masked_mean((ratio - 1) - (logp - old), mask)),
        "entropy": float(masked_mean(out.entropy, mask)),
        "entropy_sampled": float(-masked_mean(logp, mask)),
    }
    same = mask if current_version is None else mask * current_version.float()[:, None]
    if same.sum() > 0:
        diff = (logp - old).abs()
        out_metrics["logprob_mismatch"] = float(masked_mean(diff, same))
        out_metrics["logprob_mismatch_max"] = float((diff * same).max())
    return out_metrics


class ClippedPolicyGradient:
    """The objective of the algorithms whose advantages the driver computes (GRPO, ema_baseline):
    batch["advantages"] [B], one per completion."""

    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.reference: torch.nn.Module | None = None  # frozen policy for the KL term

    def set_reference(self, model: torch.nn.Module) -> None:
        self.reference = model.eval().requires_grad_(False)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        out = policy_forward(model, batch["input_ids"], batch["attention_mask"], self.cfg.temperature)
        return clipped_policy_loss(out, batch, batch["advantages"], self.cfg, self.reference)
