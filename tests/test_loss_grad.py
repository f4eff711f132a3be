"""Gradients: finite differences (gradcheck, float64), hand-derived weights, and exact zeros."""

from __future__ import annotations

import pytest
import torch

from batches import random_batch
from drgrpo import LossConfig, group_advantages, kl_penalty, policy_loss
from drgrpo.config import AGGREGATIONS, KL_KINDS

SURROGATE_CONFIGS = {
    "ppo": LossConfig(aggregation="token-mean"),
    "ppo-clip-higher": LossConfig(clip_high=0.28, aggregation="token-mean"),
    "ppo-dual-clip": LossConfig(dual_clip=3.0, aggregation="token-mean"),
    "ppo-delta": LossConfig(delta=1.5, aggregation="token-mean"),
    "gspo": LossConfig(ratio_level="sequence", clip_low=0.2, clip_high=0.3, aggregation="seq-mean-token-mean"),
    "sapo": LossConfig(surrogate="sapo", aggregation="token-mean"),
}


def _gradcheck(config: LossConfig, batch, use_ref: bool) -> None:
    adv = group_advantages(batch.rewards, batch.group_size, config)

    def f(logp):
        return policy_loss(
            logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp if use_ref else None
        ).loss

    logp = batch.logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", list(SURROGATE_CONFIGS))
def test_gradcheck_each_surrogate(name):
    _gradcheck(SURROGATE_CONFIGS[name], random_batch(seed=11, ratio_scale=0.8, empty_rows=1), use_ref=False)


def test_cispo_gradient_by_hand():
    # CISPO's value is -sg(w) A logp with w = clip(r, 1 - eps_low, cap): finite differences of the
    # value would differentiate w too, so the gradient is checked against its definition instead:
    # d loss / d logp_{i,t} = -w_{i,t} A_i / N_tok (token-mean).
    batch = random_batch(seed=16, ratio_scale=1.0)
    config = LossConfig(surrogate="cispo", clip_low=0.3, clip_high=0.5, aggregation="token-mean")
    adv = group_advantages(batch.rewards, batch.group_size, config)
    logp = batch.logp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(policy_loss(logp, batch.old_logp, adv, batch.mask, config).loss, logp)
    w = torch.exp(batch.logp - batch.old_logp).clamp(0.7, 1.5)
    assert ((w == 1.5) & (batch.mask > 0)).any() and ((w == 0.7) & (batch.mask > 0)).any()  # both bounds bind
    expected = -w * adv.unsqueeze(1) * batch.mask / batch.mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_vespo_gradient_by_hand(adv_sign):
    # VESPO's value is -sg(phi(w)) A logp: the gradient is d loss / d logp_{i,t} = -phi_i A_i / N_tok (token-mean)
    # with phi_i = exp(lam + k log w_i - lam w_i), log w_i = sum_t (logp - old) (no clamp binds here), and
    # (k, lam) = (2, 3) for A >= 0, (3, 2) below (the defaults).
    batch = random_batch(seed=17, ratio_scale=0.1)
    config = LossConfig(surrogate="vespo", aggregation="token-mean")
    adv = adv_sign * group_advantages(batch.rewards, batch.group_size, config).abs()
    logp = batch.logp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(policy_loss(logp, batch.old_logp, adv, batch.mask, config).loss, logp)
    log_w = ((batch.logp - batch.old_logp) * batch.mask).sum(1)
    k, lam = (2.0, 3.0) if adv_sign > 0 else (3.0, 2.0)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    assert (phi - 1).abs().max() > 0.05  # the weights are not all 1
    expected = -(phi * adv).unsqueeze(1) * batch.mask / batch.mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_gradcheck_each_kl_estimator(kind):
    _gradcheck(LossConfig(kl=kind, beta=0.5, aggregation="token-mean"), random_batch(seed=12), use_ref=True)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradcheck_each_aggregation(aggregation):
    config = LossConfig(aggregation=aggregation, max_completion_length=11, beta=0.1)
    _gradcheck(config, random_batch(seed=13, empty_rows=1), use_ref=True)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_gradient_by_hand(kind):
    d = torch.tensor([-3.0, -0.4, 0.0, 0.7, 2.5], dtype=torch.float64)
    logp = d.clone().requires_grad_()
    (grad,) = torch.autograd.grad(kl_penalty(logp, torch.zeros_like(d), kind).sum(), logp)
    expected = {
        "k1": torch.ones_like(d),
        "k2": d,
        "k3": 1 - torch.exp(-d),
        # clamped at 10: exp(3) - 3 - 1 = 16.1 at d = -3 has no gradient
        "low_var_kl": torch.where(torch.exp(-d) + d - 1 <= 10, 1 - torch.exp(-d), 0.0),
        "abs": torch.sign(d),
    }[kind]
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


def _one_group(lengths, rewards, max_len=12):
    g = len(lengths)
    mask = (torch.arange(max_len) < torch.tensor(lengths).unsqueeze(1)).double()
    logp = (-torch.rand(g, max_len, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    return logp, mask, torch.tensor(rewards, dtype=torch.float64)


def test_dr_grpo_token_weight_is_advantage_over_g_times_l():
    lengths, rewards, L = [3, 12, 7, 1], [1.0, 0.0, 0.0, 1.0], 16
    logp, mask, r = _one_group(lengths, rewards)
    config = LossConfig.preset("dr_grpo", max_completion_length=L)
    adv = group_advantages(r, 4, config)
    torch.testing.assert_close(adv, r - r.mean(), rtol=0, atol=0)  # no std
    loss = policy_loss(logp, None, adv, mask, config).loss  # on-policy: ratio 1, inside the clip
    (grad,) = torch.autograd.grad(loss, logp)
    # d(objective)/d logp_{i,t} = A_i / (G L) on every real token, whatever the length |o_i|
    expected = -(adv / (4 * L)).unsqueeze(1) * mask
    torch.testing.assert_close(grad, expected, rtol=1e-14, atol=1e-16)


def test_grpo_token_weight_is_advantage_over_g_times_length():
    lengths, rewards = [3, 12, 7, 1], [1.0, 0.0, 0.0, 1.0]
    logp, mask, r = _one_group(lengths, rewards)
    config = LossConfig.preset("grpo", beta=0.0)
    adv = group_advantages(r, 4, config)
    std = r.std(unbiased=True)
    torch.testing.assert_close(adv, (r - r.mean()) / (std + 1e-8), rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(policy_loss(logp, None, adv, mask, config).loss, logp)
    # GRPO: A_i / (G |o_i|): the 12-token wrong answer gets 1/12 of the per-token penalty of a 1-token one
    expected = -(adv / (4 * torch.tensor(lengths, dtype=torch.float64))).unsqueeze(1) * mask
    torch.testing.assert_close(grad, expected, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("name", ["dr_grpo", "grpo", "dapo", "bnpo", "gspo", "cispo", "sapo", "seed"])
def test_equal_rewards_in_every_group_give_exactly_zero_gradient(name):
    batch = random_batch(seed=14, ratio_scale=0.5)
    rewards = torch.tensor([0.1, 0.7, -3.3], dtype=torch.float64).repeat_interleave(batch.group_size)
    config = LossConfig.preset(name, beta=0.0, max_completion_length=9)
    adv = group_advantages(rewards, batch.group_size, config)
    assert torch.count_nonzero(adv) == 0
    logp = batch.logp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(policy_loss(logp, batch.old_logp, adv, batch.mask, config).loss, logp)
    assert torch.count_nonzero(grad) == 0


def test_bf16_gradient_is_float32_accurate():
    batch = random_batch(seed=15, dtype=torch.bfloat16)
    config = LossConfig.preset("grpo", beta=0.1)
    adv = group_advantages(batch.rewards.float(), batch.group_size, config)
    grads = []
    for dtype in (torch.bfloat16, torch.float64):
        logp = batch.logp.to(dtype).requires_grad_()
        out = policy_loss(
            logp, batch.old_logp.to(dtype), adv.to(dtype), batch.mask, config, ref_logp=batch.ref_logp.to(dtype)
        )
        grads.append(torch.autograd.grad(out.loss, logp)[0].double())
    # the bf16 path upcasts to float32; its gradient is rounded to bf16 on the way back (8 bits of mantissa)
    torch.testing.assert_close(grads[0], grads[1], rtol=2**-7, atol=1e-6)
