"""The PyTorch loss and advantages against the float64 numpy reference (drgrpo.reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batches import random_batch
from drgrpo import LossConfig, group_advantages, kl_penalty, policy_loss
from drgrpo import reference as ref
from drgrpo.config import AGGREGATIONS, KL_KINDS
from drgrpo.surrogates import surrogate_names

CORE_PRESETS = ["dr_grpo", "grpo", "dapo", "bnpo", "gspo", "cispo", "sapo", "seed"]


def preset(name: str, **overrides) -> LossConfig:
    overrides.setdefault("max_completion_length", 9)
    return LossConfig.preset(name, **overrides)


def reference_loss(batch, config, adv):
    return ref.oracle_policy_loss(
        batch.logp.double().numpy(),
        batch.old_logp.double().numpy(),
        adv.double().numpy(),
        batch.mask.double().numpy(),
        config,
        batch.ref_logp.double().numpy(),
    )


@pytest.mark.parametrize("name", CORE_PRESETS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_float64_matches_reference_every_preset_and_aggregation(name, aggregation, seed):
    batch = random_batch(seed=seed, empty_rows=1, ratio_scale=0.5)
    config = preset(name, aggregation=aggregation, beta=0.05)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp)
    assert out.loss.dtype == torch.float64 and out.loss.shape == ()
    assert out.loss.item() == pytest.approx(reference_loss(batch, config, adv), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", CORE_PRESETS)
def test_float32_matches_reference(name):
    batch = random_batch(seed=3, dtype=torch.float32, empty_rows=1)
    config = preset(name, beta=0.1)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(reference_loss(batch, config, adv), rel=1e-5, abs=1e-6)


# bf16 inputs are upcast and computed in float32: against the float64 reference evaluated on the
# same (bf16-rounded) values, the documented tolerance is float32's, 1e-5 relative.
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CORE_PRESETS)
def test_half_precision_inputs_are_computed_in_float32(half, name):
    batch = random_batch(seed=4, dtype=half)
    config = preset(name, beta=0.1)
    adv = group_advantages(batch.rewards.float(), batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(reference_loss(batch, config, adv), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("surrogate", surrogate_names())
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("kl", KL_KINDS)
def test_surrogate_ratio_level_and_kl_combinations(surrogate, ratio_level, kl):
    batch = random_batch(seed=5, ratio_scale=1.0, empty_rows=2)
    config = LossConfig(
        surrogate=surrogate,
        ratio_level=ratio_level,
        kl=kl,
        beta=0.3,
        clip_low=0.2,
        clip_high=0.28,
        aggregation="seq-mean-token-mean",
        dro_beta=0.2,  # dro has no default (verl's policy_loss.dro_beta is required); the others ignore it
    )
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp)
    assert out.loss.item() == pytest.approx(reference_loss(batch, config, adv), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("dual_clip", "delta"), [(3.0, None), (None, 1.5), (2.0, 1.4)])
def test_dual_clip_and_two_sided_delta(dual_clip, delta):
    batch = random_batch(seed=6, ratio_scale=2.0)  # large ratios so both caps bind
    config = LossConfig(dual_clip=dual_clip, delta=delta, aggregation="token-mean")
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config)
    assert out.loss.item() == pytest.approx(reference_loss(batch, config, adv), rel=1e-12, abs=1e-12)
    plain = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, LossConfig(aggregation="token-mean"))
    assert out.loss.item() != pytest.approx(plain.loss.item(), rel=1e-6)  # the caps did bind


def test_on_policy_ratio_is_one_and_loss_is_minus_weighted_advantage():
    batch = random_batch(seed=7)
    config = preset("dr_grpo")
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, None, adv, batch.mask, config)
    lengths = batch.mask.sum(1)
    expected = -(adv * lengths).sum() / (len(adv) * config.max_completion_length)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert out.metrics["ratio_mean"].item() == 1.0


def test_fully_masked_batch_gives_zero_loss_and_gradient():
    batch = random_batch(seed=8)
    logp = batch.logp.clone().requires_grad_()
    for name in CORE_PRESETS:
        config = preset(name, beta=0.1)
        out = policy_loss(
            logp, batch.old_logp, batch.rewards, torch.zeros_like(batch.mask), config, ref_logp=batch.ref_logp
        )
        (grad,) = torch.autograd.grad(out.loss, logp)
        assert out.loss.item() == 0.0 and torch.count_nonzero(grad) == 0
        assert out.metrics["num_tokens"].item() == 0


def test_metrics_against_hand_counts():
    # Two completions, token ratios e^{+0.5}, e^{-0.5}, e^{0}; A = (+1, -1).
    logp = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = policy_loss(
        logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, LossConfig(aggregation="token-mean")
    )
    m = out.metrics
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)  # r = 1.65 > 1.2 with A > 0
    assert m["clip_frac_low"].item() == pytest.approx(1 / 3)  # r = 0.61 < 0.8 with A < 0
    assert m["ratio_mean"].item() == pytest.approx((np.exp(0.5) + 1 + np.exp(-0.5)) / 3)
    assert m["num_tokens"].item() == 3
    assert all(not v.requires_grad for v in m.values())


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_estimators_against_reference(kind):
    d = torch.linspace(-30, 30, 121, dtype=torch.float64)
    ref_logp = torch.full_like(d, -2.0)
    got = kl_penalty(ref_logp + d, ref_logp, kind)
    expected = [ref.oracle_kl(-2.0 + x, -2.0, kind) for x in d.tolist()]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_k3_is_nonnegative_and_low_var_kl_is_clamped():
    d = torch.linspace(-40, 40, 401, dtype=torch.float64)
    assert (kl_penalty(d, torch.zeros_like(d), "k3") >= 0).all()
    assert kl_penalty(d, torch.zeros_like(d), "low_var_kl").max().item() == 10.0


# --------------------------------------------------------------------------- advantages
ADVANTAGE_SCHEMES = [
    dict(advantage_std="none"),
    dict(advantage_std="group", std_unbiased=True, std_eps=1e-4),
    dict(advantage_std="group", std_unbiased=True, std_eps=1e-6),
    dict(advantage_std="group", std_unbiased=True, std_eps=1e-8),
    dict(advantage_std="group", std_unbiased=False, std_eps=0.0, std_zero_threshold=1e-8),
    dict(advantage_std="batch", std_unbiased=True, std_eps=1e-4),
    dict(advantage_std="batch", std_unbiased=False, std_eps=0.0),
]


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(
    scheme=st.sampled_from(ADVANTAGE_SCHEMES),
    group_size=st.integers(1, 6),
    groups=st.integers(1, 5),
    data=st.data(),
)
def test_advantages_match_reference(scheme, group_size, groups, data):
    n = group_size * groups
    rewards = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -2.0, 3.25]), min_size=n, max_size=n))
    config = LossConfig(**scheme)
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size, config)
    expected = ref.config_advantages(rewards, group_size, config)
    assert got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    if scheme["advantage_std"] == "none":
        sums = got.view(groups, group_size).sum(1)
        np.testing.assert_allclose(sums.numpy(), 0.0, atol=1e-12)  # centred per group


def test_nan_rewards_are_ignored_only_when_asked():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    config = LossConfig(advantage_std="group", std_eps=1e-4, nan_rewards="ignore")
    got = group_advantages(rewards, 3, config)
    expected = ref.config_advantages(rewards.numpy(), 3, config)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # group 1: (1, 0) -> mean 0.5, unbiased std sqrt(0.5); the NaN gets 0
    assert got[0].item() == pytest.approx(0.5 / (np.sqrt(0.5) + 1e-4), rel=1e-12)
    assert got[1].item() == 0.0
    with pytest.raises(ValueError, match=r"rewards has a non-finite value nan at position \(1,\)"):
        group_advantages(rewards, 3, LossConfig(advantage_std="group"))
