"""``verl.*`` presets against values derived by hand from verl's own formulas.

verl cannot be installed beside current ``transformers`` (it pins ``transformers<5.11`` and needs
ray), so each expected number below is worked out in the comments from
``verl/trainer/ppo/core_algos.py`` (``compute_grpo_outcome_advantage``, ``agg_loss``,
``compute_policy_loss_vanilla`` / ``_gspo`` / ``_cispo`` / ``_sapo``, ``kl_penalty``) and written with
plain ``math``, never with this library's output.
"""

from __future__ import annotations

import math

import pytest
import torch

from drgrpo.advantages import group_advantages
from drgrpo.config import LossConfig
from drgrpo.loss import policy_loss
from drgrpo.normalizer import StepNormalizer

F64 = torch.float64
PEER = "verl (hand-derived)"


def check(record, preset, quantity, ours, expected, rtol=1e-13):
    """Assert ours == expected (hand-derived) and record the difference for the parity table."""
    record.assert_close(preset, PEER, quantity, ours, expected, rtol=rtol)


def run(config, logp, old, adv, mask, ref=None):
    logp = torch.tensor(logp, dtype=F64, requires_grad=True)
    out = policy_loss(
        logp,
        torch.tensor(old, dtype=F64),
        torch.tensor(adv, dtype=F64),
        torch.tensor(mask, dtype=F64),
        config,
        ref_logp=None if ref is None else torch.tensor(ref, dtype=F64),
    )
    out.loss.backward()
    return float(out.loss), logp.grad


def test_verl_grpo_advantages(record):
    # compute_grpo_outcome_advantage: (score - mean) / (torch.std + 1e-6), torch.std unbiased.
    # Group [1, 0, 0]: mean 1/3, std = sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3).
    # Group [1, 1, 1]: std 0 -> 0 / 1e-6 = 0.
    s = math.sqrt(1 / 3)
    expected = [(2 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6), 0.0, 0.0, 0.0]
    got = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=F64), 3, LossConfig.preset("verl.grpo"))
    check(record, "verl.grpo", "advantages (fp64)", got, expected)


def test_verl_singleton_group_keeps_its_reward(record):
    # A group of one: id2mean = 0, id2std = 1, so A = (r - 0) / (1 + 1e-6) with the std, r - 0 without.
    rewards = torch.tensor([0.7, -0.2], dtype=F64)
    with_std = group_advantages(rewards, 1, LossConfig.preset("verl.grpo"))
    check(record, "verl.grpo", "advantages (fp64)", with_std, [0.7 / (1 + 1e-6), -0.2 / (1 + 1e-6)])
    without_std = group_advantages(rewards, 1, LossConfig.preset("verl.dr_grpo"))  # norm_adv_by_std_in_grpo=False
    check(record, "verl.dr_grpo", "advantages (fp64)", without_std, [0.7, -0.2])
    # ours by default: r - mean of a group of one = 0
    assert group_advantages(rewards, 1, LossConfig.preset("grpo")).abs().max() == 0


def test_verl_vanilla_dual_clip(record):
    # One token per row, token-mean over 4 tokens, clip 0.2, clip_ratio_c = 3.
    #  row 0: A=-1, r=4:   max(-A r, -A clip(r)) = max(4, 1.2) = 4;  A<0 -> min(4, -A c = 3) = 3   (dual-clipped)
    #  row 1: A=-1, r=2:   max(2, 1.2) = 2;  min(2, 3) = 2                                          (unclipped)
    #  row 2: A=+1, r=4:   max(-4, -1.2) = -1.2                                                     (clipped)
    #  row 3: A=+2, r=0.5: max(-1, -1.6) = -1                                                       (unclipped)
    #  loss = (3 + 2 - 1.2 - 1) / 4 = 0.7
    # d loss / d logp = d(-A r)/d logp / 4 = -A r / 4 where unclipped: row 1: 2/4, row 3: -1/4; else 0.
    log_r = [math.log(4), math.log(2), math.log(4), math.log(0.5)]
    old = [[0.0], [0.0], [0.0], [0.0]]
    logp = [[x] for x in log_r]
    for name in ("verl.vanilla", "verl.grpo"):
        loss, grad = run(LossConfig.preset(name), logp, old, [-1.0, -1.0, 1.0, 2.0], [[1]] * 4)
        check(record, name, "loss (fp64)", loss, 0.7)
        check(record, name, "d loss/d logp (fp64)", grad, [[0.0], [0.5], [0.0], [-0.25]])


def test_verl_seq_mean_token_sum_norm_is_a_sum_over_the_padded_width(record):
    # agg_loss "seq-mean-token-sum-norm": torch.sum(seq_losses) / loss_scale_factor, factor default
    # loss_mask.shape[-1]. On-policy (r = 1, unclipped), l = -A per token.
    # Rows: 3 tokens with A = 1 and 1 token with A = -2; padded width 4.
    #  sum = 3 (-1) + 1 (2) = -1;  / 4 = -0.25   (DESIGN's mean-over-sequences form would give -0.125)
    # d loss / d logp = -A / 4 on real tokens: row 0 -0.25, row 1 +0.5.
    config = LossConfig.preset("verl.dr_grpo")
    mask = [[1, 1, 1, 0], [1, 0, 0, 0]]
    logp = [[-1.0, -2.0, -0.5, 0.0], [-1.5, 0.0, 0.0, 0.0]]
    loss, grad = run(config, logp, logp, [1.0, -2.0], mask)
    check(record, "verl.dr_grpo", "loss (fp64)", loss, -0.25)
    check(record, "verl.dr_grpo", "d loss/d logp (fp64)", grad, [[-0.25] * 3 + [0.0], [0.5, 0, 0, 0]])
    # the same completions padded to width 8: the divisor follows the padding, -1 / 8
    wide = [row + [0] * 4 for row in mask]
    loss8, _ = run(config, [row + [0.0] * 4 for row in logp], [row + [0.0] * 4 for row in logp], [1.0, -2.0], wide)
    check(record, "verl.dr_grpo", "loss (fp64)", loss8, -0.125)
    # loss_scale_factor = 10 (our max_completion_length): -1 / 10
    loss10, _ = run(LossConfig.preset("verl.dr_grpo", max_completion_length=10), logp, logp, [1.0, -2.0], mask)
    check(record, "verl.dr_grpo", "loss (fp64)", loss10, -0.1)
    # per call by definition: a step normaliser is refused
    with pytest.raises(ValueError, match="per call"):
        policy_loss(
            torch.tensor(logp, dtype=F64),
            None,
            torch.tensor([1.0, -2.0], dtype=F64),
            torch.tensor(mask, dtype=F64),
            config,
            normalizer=StepNormalizer(num_tokens=4.0, num_sequences=2.0),
        )


@pytest.mark.parametrize("requested", [None, "token-mean", "seq-mean-token-sum"])
def test_verl_gspo_ignores_the_requested_aggregation(requested, record):
    # compute_policy_loss_gspo: log s_i = mean over real tokens of (logp - old); clip 0.2; aggregation forced to
    # seq-mean-token-mean. Row 0 (2 tokens): log-ratios 0.1, 0.3 -> s0 = e^0.2 = 1.2214 > 1.2, A0 = +1:
    #   max(-s0, -1.2) = -1.2 on both tokens (clipped: no gradient). Row 1 (1 token): log-ratio -0.1,
    #   s1 = e^-0.1, A1 = -1: max(s1, clip(s1) = s1) = s1.
    #   seq-mean-token-mean = (-1.2 + e^-0.1) / 2.   (token-mean would be (-2.4 + e^-0.1) / 3.)
    #   verl divides each row's sum by (n_i + 1e-8): (-2.4 / (2 + 1e-8) + e^-0.1 / (1 + 1e-8)) / 2, which differs
    #   from ours (n_i exactly) by ~1e-8 relative to the row terms: checked to 1e-7.
    # d loss / d logp of row 1's token: d(s1)/d logp / 2 = s1 / 1 / 2 (the mean over its 1 token).
    config = (
        LossConfig.preset("verl.gspo") if requested is None else LossConfig.preset("verl.gspo", aggregation=requested)
    )
    logp = [[-1.0, -1.0], [-2.0, 0.0]]
    old = [[-1.1, -1.3], [-1.9, 0.0]]
    loss, grad = run(config, logp, old, [1.0, -1.0], [[1, 1], [1, 0]])
    s1 = math.exp(-0.1)
    check(record, "verl.gspo", "loss (fp64)", loss, (-2.4 / (2 + 1e-8) + s1 / (1 + 1e-8)) / 2, rtol=1e-7)
    assert loss == pytest.approx((-1.2 + s1) / 2, rel=1e-14)  # the same without verl's 1e-8
    check(record, "verl.gspo", "d loss/d logp (fp64)", grad, [[0.0, 0.0], [s1 / 2, 0.0]])


def test_verl_cispo_clips_on_both_sides(record):
    # compute_policy_loss_cispo: l = -sg(clamp(r, 1 - 0.2, 1 + 0.2)) A logp, token-mean.
    #  row 0: r = 0.5 -> weight 0.8, A = 1, logp = -1:  l = -0.8 * 1 * -1 = 0.8;   dl/dlogp = -0.8
    #  row 1: r = 1.5 -> weight 1.2, A = -1, logp = -2: l = -1.2 * -1 * -2 = -2.4; dl/dlogp = 1.2
    #  loss = (0.8 - 2.4) / 2 = -0.8; grads / 2.   (TRL's cap-only CISPO would weight row 0 by 0.5.)
    logp = [[-1.0], [-2.0]]
    old = [[-1.0 - math.log(0.5)], [-2.0 - math.log(1.5)]]
    loss, grad = run(LossConfig.preset("verl.cispo"), logp, old, [1.0, -1.0], [[1], [1]])
    check(record, "verl.cispo", "loss (fp64)", loss, -0.8)
    check(record, "verl.cispo", "d loss/d logp (fp64)", grad, [[-0.4], [0.6]])


@pytest.mark.parametrize("requested", [None, "token-mean"])
def test_verl_sapo(requested, record):
    # compute_policy_loss_sapo: gate(r, tau) = sigmoid(tau (r - 1)) 4 / tau, tau = 1.0 if A > 0 else 1.05;
    # l = -gate A; aggregation forced to seq-mean-token-mean.
    #  row 0 (2 tokens, A = 1): log-ratios 0.2, 0.0 -> l = -4 sigmoid(e^0.2 - 1), -4 sigmoid(0) = -2
    #  row 1 (1 token, A = -0.5): log-ratio -0.3 -> l = (4/1.05) sigmoid(1.05 (e^-0.3 - 1)) * 0.5
    def sig(x):
        return 1 / (1 + math.exp(-x))

    # seq-mean-token-mean with verl's (n_i + 1e-8) per-row denominator (ours uses n_i: ~1e-8 relative)
    row0 = (-4 * sig(math.exp(0.2) - 1) - 2.0) / (2 + 1e-8)
    row1 = (4 / 1.05) * sig(1.05 * (math.exp(-0.3) - 1)) * 0.5 / (1 + 1e-8)
    config = (
        LossConfig.preset("verl.sapo") if requested is None else LossConfig.preset("verl.sapo", aggregation=requested)
    )
    loss, _ = run(config, [[0.2, 0.0], [-0.3, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [1.0, -0.5], [[1, 1], [1, 0]])
    check(record, "verl.sapo", "loss (fp64)", loss, (row0 + row1) / 2, rtol=1e-7)


def test_verl_low_var_kl_loss(record):
    # use_kl_loss with kl_loss_type="low_var_kl", kl_loss_coef = 0.001; pg term 0 here (A = 0).
    # kl_penalty low_var_kl: x = clamp(ref - logp, -20, 20); k = clamp(e^x - x - 1, -10, 10).
    #  token 0: logp - ref = -30 -> x = 20 -> e^20 - 21 -> clamped to 10
    #  token 1: logp - ref = 0.5 -> x = -0.5 -> e^-0.5 + 0.5 - 1
    # token-mean: 0.001 * (10 + e^-0.5 - 0.5) / 2
    config = LossConfig.preset("verl.grpo", beta=0.001)
    loss, _ = run(config, [[-31.0], [-0.5]], [[-31.0], [-0.5]], [0.0, 0.0], [[1], [1]], ref=[[-1.0], [-1.0]])
    check(record, "verl.grpo", "loss, low_var_kl (fp64)", loss, 0.001 * (10 + math.exp(-0.5) - 0.5) / 2)
