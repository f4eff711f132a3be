"""The high-entropy token mask and the entropy bonus: the float64 oracle, hand gradients, split invariance with a
step threshold, the adaptive coefficient, and the errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from batches import random_batch
from drgrpo import LossConfig, StepNormalizer, group_advantages, policy_loss
from drgrpo import reference as ref
from drgrpo.entropy import AdaptiveEntropyCoef, entropy_threshold
from drgrpo.fused import fused_policy_loss
from helpers import fused_batches
from helpers.normalizer_steps import L, gradients, make_model, make_step, max_diff, token_logp, uneven_split, whole

PRESETS = ("dr_grpo", "grpo", "dapo", "gspo", "cispo", "sapo", "trl.grpo", "trl.vespo")


def preset(name: str, **overrides) -> LossConfig:
    return LossConfig.preset(name, max_completion_length=L, **overrides)


def entropies(batch, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(batch.logp.shape, generator=g, dtype=torch.float64) * 3
    return torch.where(batch.mask.bool(), h, torch.full_like(h, float("nan")))  # padding: garbage


@pytest.mark.parametrize(("quantile", "coef"), [(0.2, 0.0), (0.5, 0.01), (1.0, 0.05), (0.0, 0.0)])
@pytest.mark.parametrize("name", PRESETS)
def test_mask_and_bonus_match_the_oracle(name, quantile, coef):
    batch = random_batch(seed=51, empty_rows=1, ratio_scale=0.3)
    h = entropies(batch, seed=1)
    config = preset(name, top_entropy_quantile=quantile, entropy_coef=coef, beta=0.05)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp, entropy=h)
    expected = ref.oracle_policy_loss(
        batch.logp.numpy(), batch.old_logp.numpy(), adv.numpy(), batch.mask.numpy(), config, batch.ref_logp.numpy(),
        entropy=h.numpy(),
    )  # fmt: skip
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    real = h[batch.mask.bool()]
    assert out.metrics["entropy_mean"].item() == pytest.approx(real.mean().item(), rel=1e-14)


def test_the_mask_keeps_the_top_quantile_by_hand():
    # 5 real tokens with entropies 0.1 0.2 0.3 0.4 0.5; q = 0.5: tau = the median 0.3, in float32 (as TRL), which
    # rounds up: 0.3 in float64 is below it, so only 0.4 and 0.5 are kept
    h = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    config = LossConfig(aggregation="token-sum", top_entropy_quantile=0.5)
    (grad,) = torch.autograd.grad(policy_loss(logp, None, adv, mask, config, entropy=h).loss, logp)
    # on-policy, token-sum: d loss / d logp = -A on kept tokens
    expected = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    assert float(torch.tensor(0.3, dtype=torch.float32)) > 0.3  # why 0.3 itself is dropped
    assert entropy_threshold(h, mask, 0.5).item() == pytest.approx(0.3, rel=1e-7)


def test_bonus_gradient_by_hand():
    # loss -= c * sum_kept H / N_kept: d loss / d H_t = -c / N_kept on kept tokens, 0 elsewhere
    batch = random_batch(seed=52, empty_rows=1)
    h = entropies(batch, seed=2).nan_to_num(0.0).requires_grad_(True)
    config = LossConfig(aggregation="token-mean", top_entropy_quantile=0.4, entropy_coef=0.3)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, entropy=h)
    (grad,) = torch.autograd.grad(out.loss, h)
    tau = entropy_threshold(h, batch.mask, 0.4)
    kept = (h.detach() >= tau) & batch.mask.bool()
    assert 0 < kept.sum() < batch.mask.sum()
    torch.testing.assert_close(grad, -0.3 * kept.double() / kept.sum(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("name", ["dr_grpo", "grpo", "dapo", "gspo"])
def test_a_step_threshold_gives_the_same_gradient_for_any_split(name, k):
    config = preset(name, top_entropy_quantile=0.3, entropy_coef=0.02)
    step = make_step(60 + k, ratio_scale=2e-4 if config.ratio_level == "sequence" else 0.3)
    adv = group_advantages(step.rewards, step.group_size, config)
    width = step.x.shape[1]
    full_mask = (torch.arange(width)[None] < step.lengths[:, None]).double()

    def ent(model, rows, t):  # the policy's entropy at each position: differentiable, like a trainer's
        logits = model(step.x[rows, :t])
        p = torch.log_softmax(logits, -1)
        return -(p.exp() * p).sum(-1)

    with torch.no_grad():
        tau = entropy_threshold(ent(make_model(step.model_seed), slice(None), width), full_mask, 0.3)

    def run(micros):
        model = make_model(step.model_seed)
        norm = StepNormalizer.from_masks([step.mask(m.rows, m.width) for m in micros], config)
        for m in micros:
            r, t = m.rows, m.width
            ref_logp = step.ref_logp[r, :t] if config.beta > 0 else None
            policy_loss(
                token_logp(model, step.x[r, :t], step.y[r, :t]), step.old_logp[r, :t], adv[r], step.mask(r, t),
                config, ref_logp=ref_logp, entropy=ent(model, r, t), entropy_threshold=tau, normalizer=norm,
            ).loss.backward()  # fmt: skip
        return gradients(model)

    whole_grad = run([whole(step)])
    assert max(float(g.abs().max()) for g in whole_grad) > 1e-3
    assert max_diff(run(uneven_split(step, k, seed=k)), whole_grad) <= 1e-12
    # P = 2 processes (DDP averages; the normaliser's world size undoes it)
    micros = uneven_split(step, 2, seed=9)
    norm = StepNormalizer.from_masks([step.mask(m.rows, m.width) for m in micros], config)
    norm = dataclasses.replace(norm, world_size=2)
    per_rank = []
    for m in micros:
        model = make_model(step.model_seed)
        r, t = m.rows, m.width
        ref_logp = step.ref_logp[r, :t] if config.beta > 0 else None
        policy_loss(
            token_logp(model, step.x[r, :t], step.y[r, :t]), step.old_logp[r, :t], adv[r], step.mask(r, t), config,
            ref_logp=ref_logp, entropy=ent(model, r, t), entropy_threshold=tau, normalizer=norm,
        ).loss.backward()  # fmt: skip
        per_rank.append(gradients(model))
    assert max_diff([(a + b) / 2 for a, b in zip(*per_rank)], whole_grad) <= 1e-12


def test_adaptive_coefficient_follows_trls_rule():
    c = AdaptiveEntropyCoef(coef=0.01, coef_min=0.0, coef_max=0.02, delta=0.005, target=0.5)
    assert c.applied() == 0.0  # nothing measured yet
    c.observe(torch.tensor([[0.2, 0.4, 9.0]]), torch.tensor([[1, 1, 0]]))  # mean 0.3 <= 0.5: more bonus
    assert c.window().tolist() == pytest.approx([0.6, 2.0])
    assert c.step() == pytest.approx(0.015) and c.applied() == pytest.approx(0.015)
    c.observe(torch.tensor([[0.2]]), torch.tensor([[1]]))
    assert c.step() == pytest.approx(0.02)  # capped at coef_max
    c.observe(torch.tensor([[0.9]]), torch.tensor([[1]]))  # above target: less bonus, and none applied
    assert c.step() == pytest.approx(0.015) and c.applied() == 0.0


def test_errors_name_the_missing_input():
    batch = random_batch(seed=53)
    config = LossConfig(aggregation="token-mean", top_entropy_quantile=0.5, entropy_coef=0.1)
    with pytest.raises(
        ValueError, match=r"top_entropy_quantile=0.5 and config.entropy_coef=0.1 needs entropy \(B, T\)"
    ):
        policy_loss(batch.logp, batch.old_logp, batch.rewards, batch.mask, config)
    norm = StepNormalizer.from_masks([batch.mask], config)
    with pytest.raises(ValueError, match="with a step normalizer needs entropy_threshold, one per step"):
        policy_loss(batch.logp, batch.old_logp, batch.rewards, batch.mask, config, entropy=batch.logp, normalizer=norm)
    with pytest.raises(ValueError, match=r"top_entropy_quantile must be in \[0, 1\], got 1.5"):
        LossConfig(top_entropy_quantile=1.5)


# --------------------------------------------------------------------------- fused


def _logits_entropy(d):
    z = d["hidden"] @ d["weight"].T
    if d["bias"] is not None:
        z = z + d["bias"]
    lp = torch.log_softmax(z / d["tau"], dim=-1)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize(("quantile", "coef"), [(0.4, 0.0), (1.0, 0.05), (0.4, 0.05)])
@pytest.mark.parametrize("name", ["dr_grpo", "gspo", "cispo"])
def test_fused_mask_and_bonus_match_the_logits_path(name, quantile, coef, given):
    d = fused_batches.make(seed=7)
    config = preset(name, top_entropy_quantile=quantile, entropy_coef=coef)
    with torch.no_grad():
        tau = entropy_threshold(_logits_entropy(d), d["mask"], quantile) if given else None
    params = fused_batches.params(d)
    lp = fused_batches.logits_logp(d["hidden"], d["weight"], d["target"], d["bias"], d["tau"])
    plain = policy_loss(lp, d["old"], d["adv"], d["mask"], config, entropy=_logits_entropy(d), entropy_threshold=tau)
    plain_grads = torch.autograd.grad(plain.loss, params)
    for chunk_size in (3, 100):
        out = fused_policy_loss(
            d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], config, old_logp=d["old"], bias=d["bias"],
            temperature=d["tau"], chunk_size=chunk_size, entropy_threshold=tau,
        )  # fmt: skip
        grads = torch.autograd.grad(out.loss, params)
        fused_batches.assert_close(out.loss, plain.loss, 1e-12, "loss")
        for what, a, b in zip(("hidden", "weight", "bias"), grads, plain_grads):
            fused_batches.assert_close(a, b, 1e-10, f"d loss / d {what}, chunk {chunk_size}")
        assert out.entropy is not None


def test_fused_bonus_with_a_step_normalizer_matches_the_logits_path():
    d = fused_batches.make(seed=8)
    config = preset("dapo", top_entropy_quantile=0.5, entropy_coef=0.1)
    with torch.no_grad():
        tau = entropy_threshold(_logits_entropy(d), d["mask"], 0.5)
    norm = StepNormalizer(num_tokens=float(d["mask"].sum()) * 2, num_sequences=12.0, world_size=1)
    params = fused_batches.params(d)
    lp = fused_batches.logits_logp(d["hidden"], d["weight"], d["target"], d["bias"], d["tau"])
    kw = dict(entropy_threshold=tau, normalizer=norm)
    plain = policy_loss(lp, d["old"], d["adv"], d["mask"], config, entropy=_logits_entropy(d), **kw)
    plain_grads = torch.autograd.grad(plain.loss, params)
    out = fused_policy_loss(
        d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], config, old_logp=d["old"], bias=d["bias"],
        temperature=d["tau"], chunk_size=4, **kw,
    )  # fmt: skip
    for what, a, b in zip(("hidden", "weight", "bias"), torch.autograd.grad(out.loss, params), plain_grads):
        fused_batches.assert_close(a, b, 1e-10, f"d loss / d {what}")
