"""``trl.<loss_type>`` presets against TRL's own GRPO code, on random ragged batches.

TRL's loss lives in ``GRPOTrainer._compute_loss`` and its advantages in
``GRPOTrainer._generate_and_score_completions``; both are called here as unbound methods on a
stand-in trainer (:class:`TRLStandIn`) that holds exactly the attributes they read, with
``GRPOConfig``'s own defaults. The model is replaced by the log-probs under test
(``_get_per_token_logps_and_entropies``), generation by fixed ragged completions (``_generate``)
and the reward functions by fixed rewards (``_calculate_rewards``): everything between (reward
scaling, NaN handling, ratios, clipping, KL, normalisers) is TRL's code.

Compared: advantages (float32, as TRL computes them), then loss and d loss / d logp in float64
given the same advantages. Tolerances are a few ulps, not loose bounds.
"""

from __future__ import annotations

import tempfile
import zlib

import pytest
import torch

from drgrpo.advantages import group_advantages
from drgrpo.config import LossConfig
from drgrpo.normalizer import StepNormalizer
from helpers.trl_standin import (
    B,
    G,
    GRPOConfig,
    GRPOTrainer,
    TRLStandIn,
    inputs_for,
    our_loss,
    ours_for,
    ragged_batch,
    trl_args,
)


def trl_advantages(args, rewards, lengths, logp):
    stand_in = TRLStandIn(args, logp=logp.detach(), ref_logp=logp.detach(), rewards=rewards, lengths=lengths)
    out = GRPOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"}] * B)
    return out["advantages"], out["completion_mask"], out["num_items_in_batch"]


def trl_loss(args, inputs, logp, ref, grad_accum=1):
    logp = logp.detach().clone().requires_grad_(True)
    stand_in = TRLStandIn(args, logp=logp, ref_logp=ref, grad_accum=grad_accum)
    loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]

CASES = [
    pytest.param(lt, dict(scale_rewards=sr, beta=beta), id=f"{lt}-{sr}-beta{beta}")
    for lt in LOSS_TYPES
    for sr in ("group", "batch", "none")
    for beta in (0.0, 0.04)
]
CASES += [
    pytest.param(lt, extra, id=f"{lt}-{name}")
    for lt in LOSS_TYPES
    for name, extra in {
        "eps_high": dict(epsilon_high=0.28 if lt != "cispo" else 1.1),
        "sequence": dict(importance_sampling_level="sequence", beta=0.04),
        "kl-no-bias-correction": dict(beta=0.1, use_bias_correction_kl=False),
    }.items()
]
CASES += [pytest.param(lt, dict(delta=1.5, beta=0.04), id=f"{lt}-delta") for lt in ("grpo", "bnpo", "dr_grpo", "dapo")]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("loss_type", "extra"), CASES)
def test_trl_loss_and_grad(loss_type, extra, record):
    args = trl_args(loss_type, **extra)
    config = ours_for(args)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=zlib.crc32(f"{loss_type}{extra}".encode()))

    # advantages: TRL's float32 pipeline against ours on the same float32 rewards
    adv_trl, mask, num_items = trl_advantages(args, rewards, lengths, logp)
    adv_ours = group_advantages(rewards, G, config)
    assert adv_ours.dtype == adv_trl.dtype == torch.float32
    record(f"trl.{loss_type}", "trl 1.16.0", "advantages (fp32)", adv_ours, adv_trl)
    torch.testing.assert_close(adv_ours, adv_trl, rtol=2e-6, atol=2e-6)

    # loss and gradient in float64 on TRL's advantages
    adv = adv_trl.double()
    inputs = inputs_for(mask, adv, old, ref, num_items)
    loss_trl, grad_trl = trl_loss(args, inputs, logp, ref)
    loss_ours, grad_ours = our_loss(config, logp, old, adv, mask, ref)
    record(f"trl.{loss_type}", "trl 1.16.0", "loss (fp64)", loss_ours, loss_trl)
    record(f"trl.{loss_type}", "trl 1.16.0", "d loss/d logp (fp64)", grad_ours, grad_trl)
    assert grad_trl.abs().max() > 0  # the comparison is not vacuous
    if loss_type == "sapo":
        # TRL builds SAPO's temperatures with torch.where(A > 0, 1.0, 1.05): a float32 tensor even for
        # float64 inputs, so its tau_neg is 1.05 rounded to float32. That rounding is the whole difference:
        # with the same rounded tau the two agree to the last bits.
        assert float(loss_ours - loss_trl) != 0.0
        tau32 = dict(
            sapo_tau_pos=float(torch.tensor(config.sapo_tau_pos, dtype=torch.float32)),
            sapo_tau_neg=float(torch.tensor(config.sapo_tau_neg, dtype=torch.float32)),
        )
        loss_ours, grad_ours = our_loss(config.replace(**tau32), logp, old, adv, mask, ref)
        record(f"trl.{loss_type}", "trl 1.16.0", "loss, tau in fp32", loss_ours, loss_trl)
        record(f"trl.{loss_type}", "trl 1.16.0", "grad, tau in fp32", grad_ours, grad_trl)
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_trl_gradient_accumulation(loss_type, record):
    """Two micro-batches of one generation batch (gradient_accumulation_steps = steps_per_generation = 2).

    TRL divides grpo and dr_grpo by the accumulation steps and dapo by the generation batch's token
    count, which a StepNormalizer reproduces; bnpo divides by each micro-batch's own tokens, which
    the per-call ``trl.bnpo`` preset reproduces (summed, over 2 for TRL's accumulation scaling).
    """
    args = trl_args(loss_type, beta=0.04, gradient_accumulation_steps=2)
    assert args.steps_per_generation == 2
    config = ours_for(args)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=11)
    adv, mask, num_items = trl_advantages(args, rewards, lengths, logp)
    adv = adv.double()
    halves = [slice(0, B // 2), slice(B // 2, B)]

    loss_trl = torch.zeros((), dtype=torch.float64)
    grad_trl = torch.zeros_like(logp)
    for rows in halves:
        inputs = inputs_for(mask[rows], adv[rows], old[rows], ref[rows], num_items)
        loss, grad = trl_loss(args, inputs, logp[rows], ref[rows], grad_accum=2)
        loss_trl += loss
        grad_trl[rows] = grad

    loss_ours = torch.zeros((), dtype=torch.float64)
    grad_ours = torch.zeros_like(logp)
    if config.per_call_normalization:  # bnpo: local token mean per micro-batch, then TRL's / GA
        for rows in halves:
            loss, grad = our_loss(config, logp[rows], old[rows], adv[rows], mask[rows], ref[rows])
            loss_ours += loss / 2
            grad_ours[rows] = grad / 2
    else:
        step = StepNormalizer(num_tokens=float(mask.sum()), num_sequences=float(B), world_size=1)
        for rows in halves:
            loss, grad = our_loss(config, logp[rows], old[rows], adv[rows], mask[rows], ref[rows], normalizer=step)
            loss_ours += loss
            grad_ours[rows] = grad
        # and the split loss is the whole batch's loss
        whole, whole_grad = our_loss(config, logp, old, adv, mask, ref)
        torch.testing.assert_close(loss_ours, whole, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_ours, whole_grad, rtol=1e-12, atol=1e-14)
    record(f"trl.{loss_type}", "trl 1.16.0 (GA=2)", "loss (fp64)", loss_ours, loss_trl)
    record(f"trl.{loss_type}", "trl 1.16.0 (GA=2)", "d loss/d logp (fp64)", grad_ours, grad_trl)
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trl_defaults_are_the_presets_defaults():
    """The presets carry TRL's GRPOConfig defaults (read from TRL, not retyped)."""
    for loss_type in LOSS_TYPES:
        args = GRPOConfig(output_dir=tempfile.gettempdir(), report_to=[], use_cpu=True, loss_type=loss_type)
        preset = LossConfig.preset(f"trl.{loss_type}")
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        assert preset.beta == args.beta
        assert preset.kl_importance_weight == args.use_bias_correction_kl
        assert preset.advantage_std == args.scale_rewards
        assert preset.ratio_level == args.importance_sampling_level
        assert preset.delta == args.delta
        if loss_type == "cispo":
            assert preset.cispo_cap == eps_high and preset.clip_low is None
        else:
            assert (preset.clip_low, preset.clip_high) == (args.epsilon, eps_high)
        if loss_type == "dr_grpo":
            assert preset.max_completion_length == args.max_completion_length
        if loss_type == "sapo":
            assert (preset.sapo_tau_pos, preset.sapo_tau_neg) == (
                args.sapo_temperature_pos,
                args.sapo_temperature_neg,
            )
