"""``oat.grpo`` and ``oat.drgrpo`` against values derived by hand from oat's learner.

oat (the Dr. GRPO authors' framework, used by understand-r1-zero) needs deepspeed, vLLM and
launchpad, so its formulas are worked out in the comments from ``oat/algorithms/ppo.py``
(``compute_monte_carlo_advantages``, ``learning_step``) and ``oat/utils/ops.py``
(``masked_sum(values, mask, axis, constant_normalizer)``, ``masked_mean``), in plain ``math``.
"""

from __future__ import annotations

import math

import torch

from drgrpo.advantages import group_advantages
from drgrpo.config import LossConfig
from drgrpo.loss import policy_loss

F64 = torch.float64
PEER = "oat (hand-derived)"


def check(record, preset, quantity, ours, expected, rtol=1e-13):
    """Assert ours == expected (hand-derived) and record the difference for the parity table."""
    record.assert_close(preset, PEER, quantity, ours, expected, rtol=rtol)


def run(config, logp, adv, mask):
    logp = torch.tensor(logp, dtype=F64, requires_grad=True)
    out = policy_loss(logp, None, torch.tensor(adv, dtype=F64), torch.tensor(mask, dtype=F64), config)
    out.loss.backward()
    return float(out.loss), logp.grad


def test_oat_advantages(record):
    # critic_type "grpo": (r - mean_group) / (rewards.view(-1, G).std(dim=1) + 1e-8), torch.std unbiased.
    # Group [1, 0, 0, 1]: mean 0.5, std = sqrt(4 * 0.25 / 3) = sqrt(1/3).  "drgrpo": r - mean only.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-8)
    check(
        record,
        "oat.grpo",
        "advantages (fp64)",
        group_advantages(rewards, 4, LossConfig.preset("oat.grpo")),
        [a, -a, -a, a],
    )
    drgrpo = group_advantages(rewards, 4, LossConfig.preset("oat.drgrpo"))
    check(record, "oat.drgrpo", "advantages (fp64)", drgrpo, [0.5, -0.5, -0.5, 0.5])


MASK = [[1, 1, 1, 0], [1, 0, 0, 0]]
LOGP = [[-1.0, -2.0, -0.5, 0.0], [-1.5, 0.0, 0.0, 0.0]]


def test_oat_drgrpo_loss(record):
    # masked_aggregator = masked_sum(., axis=1, constant_normalizer=generate_max_length), then .mean() over rows.
    # On-policy (r = 1): pg_loss_max = max(-A r, -A clip(r)) = -A per token.
    # Rows: 3 tokens with A = 1 -> -3 / L; 1 token with A = -1 -> +1 / L; mean = (-3 + 1) / (2 L).
    # L = 512 (OATArgs.generate_max_length): -1/512. d loss / d logp = -A / (2 L) on real tokens.
    loss, grad = run(LossConfig.preset("oat.drgrpo"), LOGP, [1.0, -1.0], MASK)
    check(record, "oat.drgrpo", "loss (fp64)", loss, -1 / 512)
    g = 1 / (2 * 512)
    check(record, "oat.drgrpo", "d loss/d logp (fp64)", grad, [[-g, -g, -g, 0.0], [g, 0, 0, 0]])
    # --generate_max_length 3000 as in the Dr. GRPO paper's runs
    loss3000, _ = run(LossConfig.preset("oat.drgrpo", max_completion_length=3000), LOGP, [1.0, -1.0], MASK)
    check(record, "oat.drgrpo", "loss (fp64)", loss3000, -2 / (2 * 3000))


def test_oat_grpo_loss(record):
    # masked_mean(., axis=1) = sum_t / |o_i|, then .mean() over rows. On-policy, l = -A per token.
    # Row 0: A = 1 over 3 tokens -> -1; row 1: A = -0.5 over 1 token -> 0.5; mean = -0.25.
    # d loss / d logp = -A / (|o_i| * 2): row 0 -1/6 per token, row 1 0.25.
    loss, grad = run(LossConfig.preset("oat.grpo"), LOGP, [1.0, -0.5], MASK)
    check(record, "oat.grpo", "loss (fp64)", loss, -0.25)
    check(record, "oat.grpo", "d loss/d logp (fp64)", grad, [[-1 / 6] * 3 + [0.0], [0.25, 0, 0, 0]])
