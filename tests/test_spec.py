"""The specified function against hand-computed cases and the independent float64 reference, and the paper's variant.

The specification (docs/specification.md): for one group of G completions with sequence-level log-probs,
``A_i = (r_i - mean r) / std r`` (population std; all zero when std < 1e-8), ``rho_i = exp(lp_i - lp_old_i)``,
``loss = -(mean_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) - beta mean_i (lp_i - lp_ref_i))``.
The oracles are numbers worked out by hand below (chosen so that every float64 operation is exact where the
test asserts equality) and :mod:`drgrpo.reference`, written with Python loops and ``math`` apart from the code
under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drgrpo import LossConfig, dr_grpo_objective, dr_grpo_paper_objective, group_advantages, policy_loss
from drgrpo import reference as ref

finite = st.floats(-30, 0, allow_nan=False, allow_infinity=False)


@st.composite
def groups(draw):
    g = draw(st.integers(1, 16))
    lp = draw(st.lists(finite, min_size=g, max_size=g))
    shift = draw(st.lists(st.floats(-8, 8), min_size=g, max_size=g))  # large log-ratios too
    lp_ref = draw(st.lists(finite, min_size=g, max_size=g))
    kind = draw(st.sampled_from(["binary", "equal", "real"]))
    if kind == "binary":
        rewards = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=g, max_size=g))
    elif kind == "equal":
        rewards = [draw(st.floats(-5, 5))] * g
    else:
        rewards = draw(st.lists(st.floats(-10, 10), min_size=g, max_size=g))
    lp_old = [a - s for a, s in zip(lp, shift)]
    eps = draw(st.sampled_from([0.0, 0.1, 0.2, 0.28]))
    beta = draw(st.sampled_from([0.0, 0.04, 0.5]))
    return lp, lp_old, lp_ref, rewards, eps, beta


def reference_loss(lp, lp_old, lp_ref, rewards, eps, beta) -> float:
    """The specification through drgrpo.reference: its loop-written advantages, per-token losses and aggregation."""
    g = len(rewards)
    config = LossConfig.preset("seed", clip_low=max(eps, 1e-300), clip_high=max(eps, 1e-300), beta=beta)
    adv = ref.oracle_group_advantages(rewards, g, std="group", unbiased=False, zero_threshold=1e-8)
    col = lambda x: np.reshape(np.asarray(x, dtype=np.float64), (g, 1))  # (G, 1): one token per completion
    return float(ref.oracle_policy_loss(col(lp), col(lp_old), adv, np.ones((g, 1)), config, col(lp_ref)))


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(groups())
def test_matches_the_independent_reference(case):
    lp, lp_old, lp_ref, rewards, eps, beta = case
    expected = reference_loss(lp, lp_old, lp_ref, rewards, eps, beta)
    got = dr_grpo_objective(lp, lp_old, lp_ref, rewards, epsilon=eps, beta=beta)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-13, abs=1e-13)
    # numpy arrays in, same number out
    arrays = [np.asarray(x) for x in (lp, lp_old, lp_ref, rewards)]
    assert dr_grpo_objective(*arrays, epsilon=eps, beta=beta) == got


# Hand-computed cases. Where the inputs make every float64 operation exact (ratios of exactly 1, dyadic
# log-probs, rewards whose mean and population std are powers of two) the result is asserted to the last bit.


def test_exact_group_of_two_on_policy():
    # rewards (1, 0): mean 1/2, population std 1/2 -> A = (+1, -1). On-policy: every ratio is exactly 1,
    # so the surrogate is mean(1 * 1, 1 * -1) = 0. KL terms lp - lp_ref: -0.5 + 0.75 = 0.25, -1 + 1.5 = 0.5,
    # mean 0.375. loss = -(0 - 0.04 * 0.375).
    got = dr_grpo_objective([-0.5, -1.0], [-0.5, -1.0], [-0.75, -1.5], [1.0, 0.0])
    assert got == -(0.0 - 0.04 * 0.375)


def test_exact_group_of_four():
    # rewards (1, 1, 0, 0): mean 1/2, deviations +-1/2, population variance 1/4, std 1/2 -> A = (1, 1, -1, -1).
    # On-policy with eps = 0.2: surrogate mean (1 + 1 - 1 - 1) / 4 = 0. beta = 0: the loss is exactly 0.
    got = dr_grpo_objective([-1.0, -2.0, -0.25, -4.0], [-1.0, -2.0, -0.25, -4.0], [0.0] * 4, [1, 1, 0, 0], beta=0.0)
    assert got == 0.0
    # beta = 0.5, lp_ref = lp + (0.5, 0.25, 0.125, 0.125): KL terms (-0.5, -0.25, -0.125, -0.125), mean -0.25,
    # loss = -(0 - 0.5 * -0.25) = -0.125
    lp = [-1.0, -2.0, -0.25, -4.0]
    lp_ref = [-0.5, -1.75, -0.125, -3.875]
    assert dr_grpo_objective(lp, lp, lp_ref, [1, 1, 0, 0], beta=0.5) == -0.125


def test_exact_zero_clip_range():
    # epsilon = 0 clips every ratio to exactly 1, so the surrogate is mean(A) = 0 whatever the log-probs
    lp, lp_old = [-0.3, -1.7, -2.2], [-1.1, -0.4, -2.9]
    assert dr_grpo_objective(lp, lp_old, lp, [5.0, -1.0, 2.0], epsilon=0.0, beta=0.04) == 0.0


def test_a_spread_below_the_threshold_gives_zero_advantages():
    # rewards (1, 1 + 2e-9): population std 1e-9 < 1e-8, so A = 0 and only the KL term remains:
    # KL terms (-0.5 + 0.25, -2 + 1.5) = (-0.25, -0.5), mean -0.375; loss = -(0 - 0.04 * -0.375)
    got = dr_grpo_objective([-0.5, -2.0], [-3.0, -0.1], [-0.25, -1.5], [1.0, 1.0 + 2e-9])
    assert got == -(0.0 - 0.04 * -0.375)


def test_clipped_above_and_below():
    # rewards (0, 4): mean 2, std 2 -> A = (-1, +1).
    # completion 0: A = -1, ratio e^-0.5 = 0.6065 < 0.8: min(-0.6065, -0.8) = -0.8 (the clip binds)
    # completion 1: A = +1, ratio e^0.5 = 1.6487 > 1.2: min(1.6487, 1.2) = 1.2 (the clip binds)
    # surrogate mean (-0.8 + 1.2) / 2 = 0.2; KL terms (0, 0); loss -0.2
    got = dr_grpo_objective([-1.5, -0.5], [-1.0, -1.0], [-1.5, -0.5], [0.0, 4.0])
    assert got == pytest.approx(-0.2, rel=1e-15)
    # the pessimistic side: A = -1 with ratio e^0.5 > 1.2 is NOT clipped: min(-1.6487, -1.2) = -1.6487
    got = dr_grpo_objective([-0.5, -1.0], [-1.0, -1.0], [-0.5, -1.0], [0.0, 4.0], beta=0.0)
    assert got == pytest.approx(-(-math.exp(0.5) + 1.0) / 2, rel=1e-15)


def test_equal_rewards_leave_only_the_kl_term():
    lp, lp_ref = [-1.0, -2.0, -0.5], [-1.5, -2.0, -1.0]
    got = dr_grpo_objective(lp, [-3.0, -1.0, 0.0], lp_ref, [1.0, 1.0, 1.0], beta=0.04)
    assert got == pytest.approx(0.04 * ((0.5 + 0.0 + 0.5) / 3), rel=1e-15)


def test_hand_computed_group_of_two():
    # rewards (1, 0): mean 0.5, population std 0.5 -> A = (+1, -1).
    # ratios e^0.5 = 1.6487 (clipped to 1.2 for A = +1), e^-0.1 = 0.9048 (inside the clip range).
    lp, lp_old, lp_ref = [-0.5, -1.1], [-1.0, -1.0], [-0.7, -1.0]
    surrogate = (min(math.exp(0.5), 1.2) * 1 + math.exp(-0.1) * -1) / 2
    kl = ((-0.5 + 0.7) + (-1.1 + 1.0)) / 2
    assert dr_grpo_objective(lp, lp_old, lp_ref, [1, 0]) == pytest.approx(-(surrogate - 0.04 * kl), rel=1e-14)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(groups())
def test_seed_preset_with_one_token_per_completion_equals_the_spec(case):
    lp, lp_old, lp_ref, rewards, eps, beta = case
    assume(eps > 0)  # LossConfig needs clip_high > 0; eps = 0 is covered by the test above
    config = LossConfig.preset("seed", clip_low=eps, clip_high=eps, beta=beta)
    t = lambda x: torch.tensor(x, dtype=torch.float64).unsqueeze(1)  # (G, 1)
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), len(rewards), config)
    out = policy_loss(t(lp), t(lp_old), adv, torch.ones(len(rewards), 1), config, ref_logp=t(lp_ref))
    expected = dr_grpo_objective(lp, lp_old, lp_ref, rewards, epsilon=eps, beta=beta)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(groups())
def test_paper_objective_has_no_std_division(case):
    lp, lp_old, lp_ref, rewards, eps, beta = case
    assume(eps > 0)
    g = len(rewards)
    config = LossConfig(clip_low=eps, clip_high=eps, kl="k1", beta=beta, max_completion_length=1)
    per_token = ref.per_token_losses(
        np.reshape(lp, (g, 1)),
        np.reshape(lp_old, (g, 1)),
        np.asarray(rewards) - np.mean(rewards),
        np.ones((g, 1)),
        config,
        np.reshape(lp_ref, (g, 1)),
    )
    expected = float(per_token.mean())
    got = dr_grpo_paper_objective(lp, lp_old, lp_ref, rewards, epsilon=eps, beta=beta)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_paper_objective_differs_from_spec_when_std_is_not_one():
    args = ([-0.5, -1.1, -2.0], [-0.6, -1.0, -2.0], [-0.5, -1.0, -2.0], [3.0, 0.0, 0.0])
    assert dr_grpo_paper_objective(*args, beta=0.04) != pytest.approx(dr_grpo_objective(*args), rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"rewards": [[1.0, 0.0]]}, ValueError, "rewards must be 1-D"),
        ({"log_probs": [0.0]}, ValueError, "log_probs must have length G=2"),
        ({"ref_log_probs": [0.0, 0.0, 0.0]}, ValueError, "ref_log_probs must have length G=2"),
        ({"log_probs": [0.0, float("nan")]}, ValueError, "log_probs has a non-finite value nan at position 1"),
        ({"rewards": [float("inf"), 0.0]}, ValueError, "rewards has a non-finite value inf at position 0"),
        ({"rewards": []}, ValueError, "rewards must hold at least one completion"),
        ({"epsilon": -0.1}, ValueError, "epsilon must be >= 0"),
        ({"beta": -1.0}, ValueError, "beta must be >= 0"),
        ({"beta": "0.1"}, TypeError, "beta must be a finite number"),
        ({"log_probs": "ab"}, TypeError, "log_probs must be a 1-D list or numpy array"),
        ({"rewards": ["a", "b"]}, TypeError, "rewards must hold numbers"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, words):
    args = {
        "log_probs": [-1.0, -2.0],
        "log_probs_old": [-1.0, -2.0],
        "ref_log_probs": [-1.0, -2.0],
        "rewards": [1.0, 0.0],
    }
    args.update(kwargs)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        dr_grpo_objective(**args)
