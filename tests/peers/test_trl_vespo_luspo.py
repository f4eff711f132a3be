"""``trl.vespo`` and ``trl.luspo`` against TRL's own ``_compute_loss`` (run live on the stand-in trainer of
``helpers/trl_standin.py``), with and without the vLLM correction, at K = 1 and with gradient accumulation (K = 2
micro-batches of one generation batch)."""

from __future__ import annotations

import tempfile
import zlib

import pytest
import torch

from drgrpo.config import LossConfig
from drgrpo.loss import policy_loss
from drgrpo.normalizer import StepNormalizer
from helpers.trl_standin import (
    VESPO_FIELDS,
    B,
    GRPOConfig,
    GRPOTrainer,
    StandIn,
    inputs_for,
    our_loss,
    ours_for_vespo_luspo,
    ragged_batch,
    sampler_lists,
    trl_args,
    trl_generation,
    trl_loss_vllm,
    trl_step,
)


def trl_loss_of(args, inputs, logp, ref, grad_accum=1):
    lp = logp.detach().clone().requires_grad_(True)
    loss = GRPOTrainer._compute_loss(StandIn(args, logp=lp, ref_logp=ref, grad_accum=grad_accum), None, inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


CASES = [
    pytest.param("vespo", {}, id="vespo"),
    pytest.param("vespo", dict(beta=0.04), id="vespo-kl"),
    pytest.param(
        "vespo", dict(vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=1.0), id="vespo-gamma"
    ),
    pytest.param("luspo", {}, id="luspo-token"),
    pytest.param("luspo", dict(importance_sampling_level="sequence", beta=0.04), id="luspo-sequence-kl"),
    pytest.param("luspo", dict(epsilon_high=0.28, delta=1.5), id="luspo-clip-higher-delta"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("loss_type", "extra"), CASES)
def test_loss_and_grad_against_trl(loss_type, extra, record):
    args = trl_args(loss_type, **extra)
    config = ours_for_vespo_luspo(args)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=zlib.crc32(f"{loss_type}{extra}".encode()))
    out = trl_generation(args, lengths, logp, rewards)
    adv, mask = out["advantages"].double(), out["completion_mask"]
    inputs = inputs_for(mask, adv, old, ref, out["num_items_in_batch"])
    loss_trl, grad_trl = trl_loss_of(args, inputs, logp, ref)
    loss_ours, grad_ours = our_loss(config, logp, old, adv, mask, ref)
    record(f"trl.{loss_type}", "trl 1.16.0", "loss (fp64)", loss_ours, loss_trl)
    record(f"trl.{loss_type}", "trl 1.16.0", "d loss/d logp (fp64)", grad_ours, grad_trl)
    assert grad_trl.abs().max() > 0
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
@pytest.mark.parametrize("loss_type", ["vespo", "luspo"])
def test_with_the_vllm_correction_against_trl(loss_type, mode, record):
    args = trl_args(
        loss_type, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.8,
        vllm_importance_sampling_clip_max=1.2,
    )  # fmt: skip
    config = ours_for_vespo_luspo(args).replace(sampling_correction=mode, sampling_clip_min=0.8, sampling_clip_max=1.2)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=zlib.crc32(f"vllm{loss_type}{mode}".encode()))
    sampling_lists, sampling = sampler_lists(old, lengths, seed=4)
    out, _ = trl_step(args, lengths, old, rewards, sampling_lists)
    adv, mask = out["advantages"].double(), out["completion_mask"]
    inputs = inputs_for(mask, adv, old, ref, out["num_items_in_batch"])
    inputs.update(
        importance_sampling_ratio=out["importance_sampling_ratio"],
        sampling_per_token_logps=out["sampling_per_token_logps"],
    )
    loss_trl, grad_trl = trl_loss_vllm(args, inputs, logp, ref, sampling_lists)
    lp = logp.detach().clone().requires_grad_(True)
    ours = policy_loss(lp, old, adv, mask, config, ref_logp=ref, sampling_logp=sampling)
    (grad_ours,) = torch.autograd.grad(ours.loss, lp)
    record(f"trl.{loss_type} + {mode}", "trl 1.16.0", "d loss/d logp (fp64)", grad_ours, grad_trl)
    torch.testing.assert_close(ours.loss.detach(), loss_trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)
    plain, _ = our_loss(config.replace(sampling_correction=None), logp, old, adv, mask, ref)
    assert float(plain) != pytest.approx(float(loss_trl), rel=1e-9)  # the correction mattered


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", ["vespo", "luspo"])
def test_gradient_accumulation_against_trl(loss_type, record):
    """K = 2 micro-batches of one generation batch: vespo is a step-wide token mean (a StepNormalizer), luspo is
    defined per micro-batch and divided by K (the per-call preset, each call's loss over K)."""
    args = trl_args(loss_type, beta=0.04, gradient_accumulation_steps=2)
    config = ours_for_vespo_luspo(args)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=21)
    out = trl_generation(args, lengths, logp, rewards)
    adv, mask, num_items = out["advantages"].double(), out["completion_mask"], out["num_items_in_batch"]
    halves = [slice(0, B // 2), slice(B // 2, B)]
    grad_trl, grad_ours = torch.zeros_like(logp), torch.zeros_like(logp)
    step = StepNormalizer(num_tokens=float(mask.sum()), num_sequences=float(B), world_size=1)
    for rows in halves:
        inputs = inputs_for(mask[rows], adv[rows], old[rows], ref[rows], num_items)
        _, grad_trl[rows] = trl_loss_of(args, inputs, logp[rows], ref[rows], grad_accum=2)
        if config.per_call_normalization:
            _, grad = our_loss(config, logp[rows], old[rows], adv[rows], mask[rows], ref[rows])
            grad_ours[rows] = grad / 2
        else:
            _, grad_ours[rows] = our_loss(config, logp[rows], old[rows], adv[rows], mask[rows], ref[rows], step)
    record(f"trl.{loss_type}", "trl 1.16.0 (GA=2)", "d loss/d logp (fp64)", grad_ours, grad_trl)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_presets_carry_trls_defaults():
    for loss_type in ("vespo", "luspo"):
        args = GRPOConfig(output_dir=tempfile.gettempdir(), report_to=[], use_cpu=True, loss_type=loss_type)
        preset = LossConfig.preset(f"trl.{loss_type}")
        assert (preset.beta, preset.advantage_std, preset.ratio_level) == (
            args.beta,
            args.scale_rewards,
            args.importance_sampling_level,
        )
        assert preset.kl_importance_weight == args.use_bias_correction_kl
        if loss_type == "vespo":
            assert {f: getattr(preset, f) for f in VESPO_FIELDS} == {f: getattr(args, f) for f in VESPO_FIELDS}
        else:
            assert (preset.clip_low, preset.clip_high, preset.delta) == (args.epsilon, args.epsilon, args.delta)
            assert preset.per_call_normalization
