"""GRPO / ema_baseline / PPO / SFT objectives against formulas computed here, element by element."""
import math

import pytest
import torch

from trainer.algos import (
    PPO, SFT, AlgoConfig, AlgoConfigError, EMABaseline, EMABaselinePG, GRPO, build_objective, gae, group_advantages,
)
from trainer.algos.advantages import baseline_advantages


class FixedLogits(torch.nn.Module):
    """A 'policy' whose logits are a parameter [B, T, V]: logprobs are known in closed form."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, **_):
        from models.gpt import CausalLMOutput

        return CausalLMOutput(logits=self.logits)


def _setup(seed=0, B=4, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float)
    old = torch.randn(B, T, generator=g) * 0.3 - 1.5
    return FixedLogits(logits), ids, loss_mask, old


def _ref_logp(logits, ids, temperature=1.0):
    """logprob of token t under logits at t-1, by explicit loops."""
    B, T, _ = logits.shape
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(1, T):
            row = logits[b, t - 1] / temperature
            out[b, t] = row[ids[b, t]] - math.log(sum(math.exp(x) for x in row.tolist()))
    return out


def test_group_advantages_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.2])
    adv = group_advantages(r, 3)
    for g in range(3):
        x = r[3 * g:3 * g + 3].tolist()
        mean = sum(x) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in x) / 2)  # unbiased
        for j in range(3):
            assert adv[3 * g + j].item() == pytest.approx((x[j] - mean) / (std + 1e-4), abs=1e-5)
    assert adv[3:6].abs().max() == 0  # equal rewards: no signal
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)


@pytest.mark.parametrize("kl_coef, temperature", [(0.0, 1.0), (0.1, 0.7)])
def test_grpo_loss_matches_the_formula(kl_coef, temperature):
    model, ids, mask, old = _setup()
    adv = torch.tensor([1.5, -0.5, 0.8, -2.0])
    ref = old + 0.2
    eps = 0.2
    algo = GRPO(AlgoConfig(clip_eps=eps, kl_coef=kl_coef, temperature=temperature))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "old_logprobs": old,
             "advantages": adv, "ref_logprobs": ref}
    loss, metrics = algo(model, batch)

    logp = _ref_logp(model.logits.detach(), ids, temperature)
    total, count, clipped = 0.0, 0, 0
    for b in range(4):
        for t in range(5):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t] - old[b, t])
            a = adv[b].item()
            term = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = ref[b, t].item() - logp[b, t].item()
            term += kl_coef * (math.exp(d) - d - 1)
            total += term
            count += 1
            clipped += abs(ratio - 1) > eps
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert metrics["clip_frac"] == pytest.approx(clipped / count)
    assert 0 < metrics["clip_frac"] < 1  # the case exercises both branches of the clip
    mismatch = sum(abs(logp[b, t] - old[b, t]) for b in range(4) for t in range(5) if mask[b, t]) / count
    assert metrics["logprob_mismatch"] == pytest.approx(float(mismatch), rel=1e-5)
    loss.backward()
    assert model.logits.grad.abs().sum() > 0


def test_clipping_stops_the_gradient_outside_the_trust_region():
    """Ratio far above 1 + eps with a positive advantage: the clipped branch is the min, so no
    gradient flows (d/dlogp of a constant)."""
    model, ids, mask, old = _setup()
    logp = _ref_logp(model.logits.detach(), ids)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask,
             "old_logprobs": logp - 1.0, "advantages": torch.ones(4)}  # ratio = e > 1.2
    loss, metrics = GRPO(AlgoConfig(clip_eps=0.2))(model, batch)
    loss.backward()
    assert metrics["clip_frac"] == 1.0
    assert loss.item() == pytest.approx(-1.2, rel=1e-5)
    assert model.logits.grad.abs().max() == 0


def test_logprob_mismatch_only_counts_rows_of_the_current_version():
    model, ids, mask, _ = _setup()
    logp = _ref_logp(model.logits.detach(), ids)
    old = logp.clone()
    old[1] -= 0.5  # a stale row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "old_logprobs": old,
             "advantages": torch.zeros(4), "current_version": torch.tensor([True, False, True, True])}
    _, metrics = GRPO(AlgoConfig())(model, batch)
    assert metrics["logprob_mismatch"] < 1e-5


def test_ema_baseline_advantages_and_loss():
    r1 = torch.tensor([1.0, 0.0, 1.0, 1.0])
    est = EMABaseline(decay=0.5, std_normalize=False)
    a1 = est(r1, 1)
    assert a1.tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25])  # baseline = first mean 0.75
    r2 = torch.tensor([0.0, 0.0, 0.0, 1.0])
    a2 = est(r2, 1)
    assert a2.tolist() == pytest.approx([-0.75, -0.75, -0.75, 0.25])  # baseline still 0.75
    assert est.baseline == pytest.approx(0.5 * 0.75 + 0.5 * 0.25)
    restored = EMABaseline(decay=0.5)
    restored.load_state_dict(est.state_dict())
    assert restored.baseline == est.baseline
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()
    assert baseline_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 0.5).tolist() == pytest.approx(
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2)

    model, ids, mask, old = _setup(1)
    adv = torch.tensor([0.3, -1.0, 2.0, 0.0])
    loss, _ = EMABaselinePG(AlgoConfig(name="ema_baseline", clip_eps=0.1))(model, {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "old_logprobs": old,
        "advantages": adv})
    logp = _ref_logp(model.logits.detach(), ids)
    terms = [-min(math.exp(logp[b, t] - old[b, t]) * adv[b].item(),
                  min(max(math.exp(logp[b, t] - old[b, t]), 0.9), 1.1) * adv[b].item())
             for b in range(4) for t in range(5) if mask[b, t]]
    # These terms cancel (sum |term| ~ 40 x |sum|): each carries its float32 logprob's error, ~eps * |logp| from
    # either side plus the ratio's, and the float32 mean ~n * eps, all relative to the terms, not to the loss.
    logp_max = max(abs(logp[b, t].item()) for b in range(4) for t in range(5) if mask[b, t])
    tol = torch.finfo(torch.float32).eps * (4 * logp_max + len(terms)) * sum(abs(x) for x in terms) / len(terms)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=tol)  # ~1.7e-6; a wrong clip moves it ~1e-2


def test_gae_matches_the_recursion_written_out():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float)
    values = torch.tensor([[9.0, 0.5, 0.2, -0.1, 9.0], [9.0, 9.0, 0.3, 0.6, 0.1]])
    rewards = torch.tensor([1.0, -2.0])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(2):
        idx = [t for t in range(5) if mask[b, t]]
        v = [values[b, t].item() for t in idx] + [0.0]
        r = [0.0] * (len(idx) - 1) + [rewards[b].item()]
        a, expected = 0.0, {}
        for j in reversed(range(len(idx))):
            a = r[j] + gamma * v[j + 1] - v[j] + gamma * lam * a
            expected[idx[j]] = a
        for t in range(5):
            assert adv[b, t].item() == pytest.approx(expected.get(t, 0.0), abs=1e-6)
            want_ret = expected[t] + values[b, t].item() if t in expected else 0.0
            assert ret[b, t].item() == pytest.approx(want_ret, abs=1e-6)


class HiddenLM(torch.nn.Module):
    """A policy with an lm_head whose input (the hidden state) the value head reads."""

    def __init__(self, V=7, H=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, H, generator=g))
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, input_ids, attention_mask=None, **_):
        from models.gpt import CausalLMOutput

        return CausalLMOutput(logits=self.lm_head(torch.tanh(self.emb[input_ids])))


def test_ppo_uses_gae_advantages_and_fits_a_clipped_value_loss():
    torch.manual_seed(0)
    model = HiddenLM()
    _, ids, mask, old = _setup(3)
    rewards = torch.tensor([1.0, 0.0, 1.0, -1.0])
    cfg = AlgoConfig(name="ppo", clip_eps=0.2, gamma=0.95, lam=0.9, value_lr=0.05, value_clip=0.2, value_epochs=3,
                     std_normalize=False)
    algo = build_objective(cfg)
    assert isinstance(algo, PPO)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "old_logprobs": old,
             "rewards": rewards}
    loss, metrics = algo(model, batch)
    # The head starts at V = 0: the advantages are the discounted rewards, the returns too, and
    # the logged value loss (before the first update) is 0.5 * mean over tokens of returns^2.
    zero_adv, returns = gae(rewards, torch.zeros(4, 5), mask, 0.95, 0.9)
    assert metrics["value_loss"] == pytest.approx(0.5 * float((returns ** 2 * mask).sum() / mask.sum()), rel=1e-5)
    logp = _ref_logp(model.lm_head(torch.tanh(model.emb[ids])).detach(), ids)
    terms = [-min(math.exp(logp[b, t] - old[b, t]) * zero_adv[b, t].item(),
                  min(max(math.exp(logp[b, t] - old[b, t]), 0.8), 1.2) * zero_adv[b, t].item())
             for b in range(4) for t in range(5) if mask[b, t]]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # The head moved off zero.
    hidden = torch.cat([torch.zeros(4, 1, 6), torch.tanh(model.emb[ids])[:, :-1]], 1)
    values = algo.value_head(hidden).squeeze(-1).detach()
    assert float(values[mask.bool()].abs().max()) > 0
    _, metrics2 = algo(model, batch)
    assert metrics2["value_loss"] < metrics["value_loss"]  # fitting the same returns lowers the loss
    clone = PPO(cfg)
    clone.load_state_dict(algo.state_dict())
    assert torch.equal(clone.value_head.weight, algo.value_head.weight)


def test_clipped_value_loss_formula():
    from trainer.algos.ppo import clipped_value_loss

    v = torch.tensor([[0.5, 1.0]])
    old = torch.tensor([[0.0, 0.9]])
    ret = torch.tensor([[1.0, 0.0]])
    # token 0: unclipped (0.5-1)^2 = .25, clipped (0.2-1)^2 = .64 -> .64; token 1: (1)^2 = 1, (1.0)^2 -> 1
    assert clipped_value_loss(v, old, ret, torch.ones(1, 2), 0.2).item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)


def test_sft_is_mean_negative_logprob_of_the_answer_tokens():
    model, ids, mask, _ = _setup(2)
    loss, _ = SFT()(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask})
    logp = _ref_logp(model.logits.detach(), ids)
    assert loss.item() == pytest.approx(-(logp * mask).sum().item() / mask.sum().item(), rel=1e-5)


def test_kl_needs_a_reference_and_bad_configs_are_named():
    model, ids, mask, old = _setup()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "old_logprobs": old,
             "advantages": torch.ones(4)}
    with pytest.raises(ValueError, match="ref_logprobs"):
        GRPO(AlgoConfig(kl_coef=0.1))(model, batch)
    algo = GRPO(AlgoConfig(kl_coef=0.1))
    algo.set_reference(FixedLogits(model.logits.detach()))
    _, metrics = algo(model, batch)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # same policy: KL 0
    with pytest.raises(AlgoConfigError, match="algo.name='a2c'"):
        build_objective(AlgoConfig(name="a2c"))
    with pytest.raises(AlgoConfigError, match="algo.clip_eps"):
        build_objective(AlgoConfig(clip_eps=1.5))
    with pytest.raises(AlgoConfigError, match="algo.lam=1.5"):
        build_objective(AlgoConfig(name="ppo", lam=1.5))


def test_truncated_importance_sampling_weights_current_rows_by_the_capped_engine_ratio():
    """algo.tis_cap: a current-version row's token loss is -A * w * exp(logp - sg(logp)) with
    w = min(exp(logp - engine_logp), cap) (value -A * w, gradient -A * w * dlogp); a stale row keeps
    the clipped ratio against the engine's logprob."""
    model, ids, mask, old = _setup(seed=3)
    logp = _ref_logp(model.logits.detach(), ids)
    old = logp + torch.tensor([[0.0, 0.1, -0.3, 0.9, -1.5]]).expand(4, 5)  # engine logprobs, some far off
    adv = torch.tensor([1.0, -0.5, 2.0, 0.7])
    current = torch.tensor([True, True, True, False])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "old_logprobs": old,
             "advantages": adv, "current_version": current}
    cap = 1.5
    loss, metrics = GRPO(AlgoConfig(tis_cap=cap))(model, batch)
    w = torch.exp(logp - old).clamp(max=cap)
    stale_ratio = torch.exp(logp[3] - old[3])
    stale_pg = -torch.min(stale_ratio * adv[3], stale_ratio.clamp(0.8, 1.2) * adv[3])
    expected_tokens = torch.cat([(-adv[:3, None] * w[:3]), stale_pg[None]], 0)
    n = mask.sum()
    assert loss.item() == pytest.approx(float((expected_tokens * mask).sum() / n), rel=1e-5)
    assert metrics["tis_weight_mean"] == pytest.approx(float((w * mask)[:3].sum() + mask[3].sum()) / float(n), rel=1e-5)
    # the gradient of a current row's token is that of -A * w * logp (w held constant)
    loss.backward()
    ref = FixedLogits(model.logits.detach())
    ref_logp = torch.log_softmax(ref.logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_logp = torch.cat([torch.zeros(4, 1), ref_logp], 1)
    surrogate = (-(adv[:3, None] * w[:3]) * ref_logp[:3] * mask[:3]).sum() / n
    surrogate.backward()
    assert torch.allclose(model.logits.grad[:3], ref.logits.grad[:3], atol=1e-6)
    with pytest.raises(AlgoConfigError, match="algo.tis_cap"):
        build_objective(AlgoConfig(tis_cap=-1.0))
