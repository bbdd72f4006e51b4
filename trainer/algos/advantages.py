"""Advantage estimators, one per algorithm; the policy loss they feed is shared
(trainer/algos/policy_loss.py).

- group_advantages (GRPO, driver side): A_i = (r_i - mean(r)) / (std(r) + eps) within each group
  of G completions of one prompt (std unbiased, as in TRL; equal rewards give A = 0).
- EMABaseline (ema_baseline, driver side): A_i = r_i - b, b an exponential moving average of past
  batch-mean rewards (b_0 = the first batch's mean), optionally divided by the batch's std.
- gae (PPO, trainer side, needs the value head): generalized advantage estimation over the
  completion tokens with the reward on the last one.
"""
from __future__ import annotations

import torch

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


def baseline_advantages(rewards: torch.Tensor, baseline: float, std_normalize: bool = True) -> torch.Tensor:
    adv = rewards.float() - baseline
    if std_normalize and rewards.numel() > 1:
        adv = adv / (rewards.float().std() + EPS)
    return adv


class GroupRelative:
    """GRPO's estimator (stateless)."""

    def __init__(self, std_normalize: bool = True):
        self.std_normalize = std_normalize

    def __call__(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return group_advantages(rewards, group_size, self.std_normalize)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EMABaseline:
    """Advantages against the baseline so far, then the baseline moves toward this batch."""

    def __init__(self, decay: float, std_normalize: bool = True):
        self.decay, self.std_normalize = decay, std_normalize
        self.baseline: float | None = None

    def __call__(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        mean = float(rewards.float().mean())
        if self.baseline is None:
            self.baseline = mean
        adv = baseline_advantages(rewards, self.baseline, self.std_normalize)
        self.baseline = self.decay * self.baseline + (1 - self.decay) * mean
        return adv

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = state.get("baseline")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al., 2016) over each row's completion tokens.

    rewards [B] (one per completion, given at its last token), values [B, T] (V of the state
    before token t), mask [B, T] (1 on completion tokens, contiguous). With V = 0 after the last
    token: delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1};
    returns_t = A_t + V_t. Returns (advantages, returns), both [B, T], 0 off the mask."""
    mask = mask.float()
    values = values.float() * mask
    B, T = mask.shape
    last = (mask * torch.arange(T, device=mask.device)).argmax(dim=1)  # the last completion token
    token_rewards = torch.zeros_like(values)
    token_rewards[torch.arange(B), last] = rewards.float()
    adv = torch.zeros_like(values)
    running = torch.zeros(B, device=values.device)
    next_value = torch.zeros(B, device=values.device)
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        adv[:, t] = running
        next_value = torch.where(m > 0, values[:, t], next_value)
    return adv, (adv + values) * mask


def build_advantage_estimator(cfg):
    """The driver-side estimator of `cfg` (AlgoConfig), or None when the trainer estimates (PPO)."""
    if cfg.name == "grpo":
        return GroupRelative(cfg.std_normalize)
    if cfg.name == "ema_baseline":
        return EMABaseline(cfg.baseline_decay, cfg.std_normalize)
    return None
