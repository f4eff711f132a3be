"""The sampler correction and the off-policy mask against TRL's own code, run live (on the stand-in trainer of
``helpers/trl_standin.py``).

TRL builds its vLLM importance-sampling ratio in ``_generate_and_score_completions`` from the log-probs its
generation step reports (the stand-in's ``_generate`` returns them, ``None`` where vLLM could not score a
token) and the trainer's own ``old_per_token_logps``; ``_compute_loss`` multiplies the per-token loss by it
and applies the off-policy mask. Both methods run here unchanged: the ratio, the metrics, the loss and its
gradient are TRL's, compared with drgrpo's ``trl.*`` presets given ``sampling_logp``.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from drgrpo.correction import SAMPLING_CORRECTIONS
from drgrpo.loss import policy_loss
from helpers.trl_standin import (
    B,
    G,
    GRPOTrainer,
    StandIn,
    TRLStandIn,
    inputs_for,
    our_loss,
    ours_for,
    ragged_batch,
    sampler_lists,
    trl_args,
    trl_loss_vllm,
    trl_step,
)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]


def sampling_fields(args) -> dict:
    return dict(
        sampling_correction=args.vllm_importance_sampling_mode,
        sampling_clip_min=args.vllm_importance_sampling_clip_min,
        sampling_clip_max=args.vllm_importance_sampling_clip_max,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
    )


CASES = [
    pytest.param(lt, mode, low, high, thr, id=f"{lt}-{mode}-{low}-{high}-opm{thr}")
    for lt in LOSS_TYPES
    for mode in SAMPLING_CORRECTIONS
    for (low, high, thr) in ((None, 3.0, None), (0.8, 1.2, None), (0.8, 1.2, 0.0))
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("loss_type", "mode", "low", "high", "threshold"), CASES)
def test_vllm_correction_against_trl(loss_type, mode, low, high, threshold, record):
    args = trl_args(
        loss_type,
        beta=0.04,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=low,
        vllm_importance_sampling_clip_max=high,
        off_policy_mask_threshold=threshold,
    )
    config = ours_for(args).replace(**sampling_fields(args))
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=zlib.crc32(f"{loss_type}{mode}{low}".encode()))
    sampling_lists, sampling = sampler_lists(old, lengths, seed=3)
    out, metrics = trl_step(args, lengths, old, rewards, sampling_lists)
    mask, adv = out["completion_mask"], out["advantages"].double()
    assert "importance_sampling_ratio" in out  # TRL built its ratio

    inputs = inputs_for(mask, adv, old, ref, out["num_items_in_batch"])
    inputs.update(
        importance_sampling_ratio=out["importance_sampling_ratio"],
        sampling_per_token_logps=out["sampling_per_token_logps"],
    )
    loss_trl, grad_trl = trl_loss_vllm(args, inputs, logp, ref, sampling_lists)
    lp = logp.detach().clone().requires_grad_(True)
    ours = policy_loss(lp, old, adv, mask, config, ref_logp=ref, sampling_logp=sampling)
    (grad_ours,) = torch.autograd.grad(ours.loss, lp)
    name = f"trl.{loss_type} + {mode}" + ("" if threshold is None else " + off-policy mask")
    assert grad_trl.abs().max() > 0
    if loss_type == "sapo":  # TRL's float32 temperatures (test_trl explains): compare with those
        tau32 = {
            f: float(torch.tensor(getattr(config, f), dtype=torch.float32)) for f in ("sapo_tau_pos", "sapo_tau_neg")
        }
        lp = logp.detach().clone().requires_grad_(True)
        ours = policy_loss(lp, old, adv, mask, config.replace(**tau32), ref_logp=ref, sampling_logp=sampling)
        (grad_ours,) = torch.autograd.grad(ours.loss, lp)
    record(name, "trl 1.16.0", "loss (fp64)", ours.loss.detach(), loss_trl)
    record(name, "trl 1.16.0", "d loss/d logp (fp64)", grad_ours, grad_trl)
    torch.testing.assert_close(ours.loss.detach(), loss_trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)
    # not vacuous: the correction changed the loss
    plain, _ = our_loss(
        config.replace(sampling_correction=None, off_policy_mask_threshold=None), logp, old, adv, mask, ref
    )
    assert float(plain) != pytest.approx(float(loss_trl), rel=1e-9)

    # TRL's metrics (one process: its gathers are the identity)
    for ours_key, trl_key in (
        ("sampling_logp_difference_mean", "sampling/sampling_logp_difference/mean"),
        ("sampling_logp_difference_max", "sampling/sampling_logp_difference/max"),
        ("importance_sampling_ratio_min", "sampling/importance_sampling_ratio/min"),
        ("importance_sampling_ratio_mean", "sampling/importance_sampling_ratio/mean"),
        ("importance_sampling_ratio_max", "sampling/importance_sampling_ratio/max"),
    ):
        assert ours.metrics[ours_key].item() == pytest.approx(metrics[trl_key], rel=1e-12), ours_key


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_off_policy_mask_without_vllm_uses_old_logp_like_trl(loss_type, record):
    args = trl_args(loss_type, beta=0.04, off_policy_mask_threshold=0.0)
    config = ours_for(args).replace(off_policy_mask_threshold=0.0)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=zlib.crc32(f"opm{loss_type}".encode()))
    stand_in = TRLStandIn(args, logp=logp.detach(), ref_logp=ref, rewards=rewards, lengths=lengths)
    out = GRPOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"}] * B)
    adv, mask = out["advantages"].double(), out["completion_mask"]
    inputs = inputs_for(mask, adv, old, ref, out["num_items_in_batch"])
    lp = logp.detach().clone().requires_grad_(True)
    loss_trl = GRPOTrainer._compute_loss(StandIn(args, logp=lp, ref_logp=ref), None, inputs)
    (grad_trl,) = torch.autograd.grad(loss_trl, lp)
    if loss_type == "sapo":
        config = config.replace(
            **{
                f: float(torch.tensor(getattr(config, f), dtype=torch.float32))
                for f in ("sapo_tau_pos", "sapo_tau_neg")
            }
        )
    loss_ours, grad_ours = our_loss(config, logp, old, adv, mask, ref)  # no sampling_logp: old_logp is the source
    record(f"trl.{loss_type} + off-policy mask", "trl 1.16.0", "d loss/d logp (fp64)", grad_ours, grad_trl)
    torch.testing.assert_close(loss_ours, loss_trl.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)
    keep = GRPOTrainer.get_off_policy_mask(adv.unsqueeze(1), logp, old, mask, 0.0)
    assert 0 < float(keep.sum()) < B  # some rows dropped: the comparison is not vacuous
    assert G == 4
