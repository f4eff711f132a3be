"""The peer presets are registered, take overrides by LossConfig field name, and keep their quirks."""

from __future__ import annotations

import pytest
import torch

from batches import random_batch
from drgrpo import peers, reference
from drgrpo.advantages import group_advantages
from drgrpo.config import LossConfig, preset_config, preset_names
from drgrpo.fused import fused_policy_loss
from drgrpo.loss import policy_loss
from drgrpo.normalizer import StepNormalizer
from drgrpo.surrogates import BATCH_COUPLED


def peer_config(name: str, **overrides) -> LossConfig:
    """The peer preset, with a constant L where it has none and needs one (verl.dr_grpo: loss_scale_factor)."""
    if (
        preset_config(name).aggregation == "seq-mean-token-sum-norm"
        and preset_config(name).max_completion_length is None
    ):
        overrides.setdefault("max_completion_length", 7)
    if preset_config(name).surrogate == "dro":  # verl's dro has no default dro_beta (policy_loss.dro_beta)
        overrides.setdefault("dro_beta", 0.2)
    return LossConfig.preset(name, **overrides)


def test_every_peer_preset_is_registered():
    names = preset_names()
    for name in peers.PEER_PRESETS:
        assert name in names
        config = peer_config(name)
        assert config.name == name
    assert {n for n in names if n.split(".")[0] in ("trl", "verl", "oat")} == set(peers.PEER_PRESETS)
    assert set(peers.PEER_VERSIONS) == {"trl", "verl", "oat"}


def test_issue_lists_every_peer_option():
    trl = {f"trl.{t}" for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")}
    modes = ("vanilla", "gspo", "cispo", "sapo", "grpo", "dr_grpo", "gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean")
    modes += ("kl_cov", "clip_cov")
    verl = {f"verl.{m}" for m in modes}
    assert trl | verl | {"oat.grpo", "oat.drgrpo"} == set(peers.PEER_PRESETS)


def test_overrides_use_field_names():
    assert LossConfig.preset("trl.dapo", clip_high=0.28).clip_high == 0.28
    assert LossConfig.preset("trl.dr_grpo", max_completion_length=4096).max_completion_length == 4096
    assert LossConfig.preset("verl.vanilla", dual_clip=5.0).dual_clip == 5.0
    assert LossConfig.preset("oat.drgrpo", beta=0.01).beta == 0.01
    with pytest.raises(ValueError, match="unknown LossConfig field"):
        LossConfig.preset("trl.grpo", epsilon_high=0.28)  # TRL's name is not a field


def test_std_epsilons():
    assert LossConfig.preset("trl.grpo").std_eps == 1e-4
    assert LossConfig.preset("verl.grpo").std_eps == 1e-6
    assert LossConfig.preset("oat.grpo").std_eps == 1e-8
    assert LossConfig.preset("oat.drgrpo").advantage_std == "none"
    assert LossConfig.preset("verl.dr_grpo", max_completion_length=16).advantage_std == "none"


def test_trl_cispo_caps_at_epsilon_high_itself():
    # TRL: clamp(r, max=epsilon_high), default epsilon_high = epsilon = 0.2: on-policy r = 1 is weighted 0.2.
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    out = policy_loss(
        logp, None, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1), LossConfig.preset("trl.cispo")
    )
    out.loss.backward()
    assert float(out.loss) == pytest.approx(-0.2 * 1.0 * -1.0)
    assert float(logp.grad) == pytest.approx(-0.2)


@pytest.mark.parametrize("name", ["trl.bnpo", "trl.dr_grpo"])
def test_per_call_presets_refuse_a_step_normalizer(name):
    config = LossConfig.preset(name)
    with pytest.raises(ValueError, match="per call"):
        policy_loss(
            torch.zeros(2, 3, dtype=torch.float64),
            None,
            torch.zeros(2, dtype=torch.float64),
            torch.ones(2, 3),
            config,
            normalizer=StepNormalizer(num_tokens=6.0, num_sequences=2.0),
        )


@pytest.mark.parametrize("name", peers.PEER_PRESETS)
def test_peer_presets_match_the_float64_reference(name):
    """Torch against drgrpo.reference (plain loops) for every peer preset, KL on, ragged rows."""
    config = peer_config(name, beta=0.05)
    batch = random_batch(num_groups=2, group_size=3, max_len=6, seed=3)
    for group_size in (batch.group_size, 1):  # 1: verl's singleton groups
        adv = group_advantages(batch.rewards, group_size, config)
        expected = reference.config_advantages(batch.rewards.numpy(), group_size, config)
        torch.testing.assert_close(adv, torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    logp = torch.where(batch.mask.bool(), batch.logp, torch.zeros_like(batch.logp))
    out = policy_loss(logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp)
    expected_loss = reference.oracle_policy_loss(logp, batch.old_logp, adv, batch.mask, config, batch.ref_logp)
    assert float(out.loss) == pytest.approx(expected_loss, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", peers.PEER_PRESETS)
def test_peer_presets_through_the_fused_path(name):
    """fused_policy_loss under each peer preset equals policy_loss on the logits path (float64)."""
    g = torch.Generator().manual_seed(5)
    b, t, h, v = 4, 5, 6, 11
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor([5, 2, 4, 1])[:, None]).double()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    config = peer_config(name, beta=0.05)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = logp.detach() + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    if config.surrogate in BATCH_COUPLED:  # a covariance over every token of the call: refused by the fused path
        with pytest.raises(ValueError, match="reads a covariance over every token of the call"):
            fused_policy_loss(hidden, weight, targets, mask, adv, config, old_logp=old, ref_logp=ref, chunk_size=3)
        return
    plain = policy_loss(logp, old, adv, mask, config, ref_logp=ref).loss
    dh, dw = torch.autograd.grad(plain, (hidden, weight))
    fused = fused_policy_loss(hidden, weight, targets, mask, adv, config, old_logp=old, ref_logp=ref, chunk_size=3)
    fdh, fdw = torch.autograd.grad(fused.loss, (hidden, weight))
    torch.testing.assert_close(fused.loss, plain, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fdh, dh, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(fdw, dw, rtol=1e-10, atol=1e-13)
