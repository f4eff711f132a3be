"""The entropy mask and bonus against TRL's ``_compute_loss`` run live (the stand-in trainer of
``helpers/trl_standin.py``, with entropies)."""

from __future__ import annotations

import zlib

import pytest
import torch

from drgrpo.loss import policy_loss
from helpers.trl_standin import (
    GRPOTrainer,
    OneProcessAccelerator,
    StandIn,
    inputs_for,
    ours_for_vespo_luspo,
    ragged_batch,
    trl_args,
    trl_generation,
)


class EntropyStandIn(StandIn):
    """The stand-in with TRL's entropy mask and bonus: ``_get_per_token_logps_and_entropies`` returns the given
    entropies (differentiable) with the log-probs."""

    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask

    def __init__(self, args, *, entropy, **kwargs):
        super().__init__(args, **kwargs)
        self.accelerator = OneProcessAccelerator()
        self.entropy_coef = args.entropy_coef
        self.use_adaptive_entropy = False
        self._entropy_bonus_enabled = args.entropy_coef != 0.0
        self._entropy = entropy

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        logp, _, aux = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep)
        return logp, self._entropy, aux


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("quantile", "coef"), [(0.3, 0.0), (1.0, 0.05), (0.5, 0.02)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_entropy_mask_and_bonus_against_trl(loss_type, quantile, coef, record):
    args = trl_args(loss_type, beta=0.04, top_entropy_quantile=quantile, entropy_coef=coef)
    config = ours_for_vespo_luspo(args).replace(top_entropy_quantile=quantile, entropy_coef=coef)
    if loss_type == "sapo":  # TRL's float32 temperatures (test_trl explains)
        config = config.replace(
            **{
                f: float(torch.tensor(getattr(config, f), dtype=torch.float32))
                for f in ("sapo_tau_pos", "sapo_tau_neg")
            }
        )
    if loss_type == "dr_grpo":
        config = config.replace(max_completion_length=args.max_completion_length)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=zlib.crc32(f"entropy{loss_type}{quantile}".encode()))
    out = trl_generation(args, lengths, logp, rewards)
    adv, mask = out["advantages"].double(), out["completion_mask"]
    inputs = inputs_for(mask, adv, old, ref, out["num_items_in_batch"])
    g = torch.Generator().manual_seed(1)
    entropy = torch.rand(logp.shape, generator=g, dtype=torch.float64) * 2

    lp, h = logp.detach().clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    stand_in = EntropyStandIn(args, entropy=h, logp=lp, ref_logp=ref)
    loss_trl = GRPOTrainer._compute_loss(stand_in, None, inputs)
    grad_trl = torch.autograd.grad(loss_trl, (lp, h), allow_unused=True)

    lp2, h2 = logp.detach().clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    ours = policy_loss(lp2, old, adv, mask, config, ref_logp=ref, entropy=h2)
    grad_ours = torch.autograd.grad(ours.loss, (lp2, h2), allow_unused=True)
    name = f"trl.{loss_type} + entropy q={quantile} c={coef}"
    record(name, "trl 1.16.0", "d loss/d logp (fp64)", grad_ours[0], grad_trl[0])
    torch.testing.assert_close(ours.loss.detach(), loss_trl.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours[0], grad_trl[0], rtol=1e-12, atol=1e-14)
    if coef:
        record(name, "trl 1.16.0", "d loss/d entropy (fp64)", grad_ours[1], grad_trl[1])
        torch.testing.assert_close(grad_ours[1], grad_trl[1], rtol=1e-12, atol=1e-14)
    # TRL's "entropy" metric (one process): the masked mean over real tokens
    assert ours.metrics["entropy_mean"].item() == pytest.approx(stand_in._metrics["train"]["entropy"][-1], rel=1e-12)
    if quantile < 1:  # the mask dropped something
        plain = policy_loss(logp, old, adv, mask, config.replace(top_entropy_quantile=1.0), ref_logp=ref, entropy=h2)
        assert float(plain.loss) != pytest.approx(float(loss_trl), rel=1e-9)
