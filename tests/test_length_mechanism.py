"""The length-bias mechanism in the controlled policy: hand-derived expectations against the code.

Three independent checks of ``drgrpo.length_bias``'s closed forms: finite differences of the length
distribution (the score and GRPO's pull), an exhaustive float64 enumeration of every group of a small
policy pushed through the real ``group_advantages`` + ``policy_loss`` + autograd (exact), and a Monte-Carlo
estimate on sampled groups of the realistic size, with a tolerance from its standard error that a wrong
formula fails (checked: the other aggregation's formula, and the length counted without the EOS token).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from drgrpo.advantages import group_advantages
from drgrpo.length_bias import (
    ARMS,
    MechanismConfig,
    StopPolicy,
    advantage_mass,
    arm_config,
    batch_gradient,
    expected_flow,
    expected_gradient,
    length_distribution,
    mean_length,
    stop_pull,
    train_policy,
)
from drgrpo.loss import policy_loss


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# --------------------------------------------------------------------------- the length distribution


@pytest.mark.parametrize(("p", "length"), [(0.25, 16), (0.6, 5), (0.05, 8), (0.5, 2)])
def test_score_is_the_derivative_of_the_log_probability_and_has_mean_zero(p, length):
    prob, lengths, score = length_distribution(p, length)
    assert prob.sum() == pytest.approx(1.0, abs=1e-14)
    # the lengths by hand: n working tokens + answer + EOS, the last entry cut off at L (no EOS)
    assert lengths.tolist() == [*range(2, length + 1), length]
    h = 1e-6
    up, _, _ = length_distribution(1 / (1 + math.exp(-(_logit(p) + h))), length)
    down, _, _ = length_distribution(1 / (1 + math.exp(-(_logit(p) - h))), length)
    np.testing.assert_allclose(score, (np.log(up) - np.log(down)) / (2 * h), rtol=0, atol=1e-7)
    assert float(np.sum(prob * score)) == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize(("p", "length"), [(0.25, 16), (0.6, 5), (0.05, 8)])
def test_grpo_pull_is_the_slope_of_the_mean_inverse_length(p, length):
    # E[g / |o|] = d/dphi E[1/|o|]: GRPO's expected gradient pushes on E[1/|o|] itself
    def mean_inverse(phi: float) -> float:
        prob, lengths, _ = length_distribution(1 / (1 + math.exp(-phi)), length)
        return float(np.sum(prob / lengths))

    h = 1e-6
    slope = (mean_inverse(_logit(p) + h) - mean_inverse(_logit(p) - h)) / (2 * h)
    grpo = stop_pull(p, length, arm_config("grpo", length))
    assert grpo == pytest.approx(slope, rel=1e-7)
    assert grpo > 0.0  # more stopping, shorter completions, larger 1/|o|
    assert stop_pull(p, length, arm_config("dr_grpo", length)) == pytest.approx(0.0, abs=1e-15)
    by_hand = sum((1 - p) ** n * p * (n + 2) for n in range(length - 1)) + (1 - p) ** (length - 1) * length
    assert mean_length(p, length) == pytest.approx(by_hand, rel=1e-13)


# --------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize(("q", "g"), [(0.3, 4), (0.8, 5)])
def test_advantage_mass_against_enumerating_every_group(arm, q, g):
    config = arm_config(arm, 16)
    m_right = m_wrong = 0.0
    for outcome in itertools.product((0.0, 1.0), repeat=g):
        prob = math.prod(q if r else 1 - q for r in outcome)
        adv = group_advantages(torch.tensor(outcome, dtype=torch.float64), g, config)
        m_right += prob * float(adv[0]) * outcome[0]
        m_wrong += prob * float(adv[0]) * (1 - outcome[0])
    got = advantage_mass(q, g, config)
    assert got == pytest.approx((m_right, m_wrong), rel=1e-12, abs=1e-15)
    assert got[0] == pytest.approx(-got[1], rel=1e-12)  # advantages sum to zero in every group
    if config.advantage_std == "none":
        assert got[0] == pytest.approx(q * (1 - q) * (g - 1) / g, rel=1e-14)


# --------------------------------------------------------------------------- the expected gradient, exactly


def _enumerated_gradient(arm: str, sees: bool, g: int, length: int, theta: float, phi: list[float]) -> np.ndarray:
    """Every group of ``g`` completions at once through policy_loss, each weighted by its probability."""
    config = arm_config(arm, length)
    policy = StopPolicy(0.5, 0.5, sees)
    with torch.no_grad():
        policy.theta.fill_(theta)
        policy.phi.copy_(torch.tensor(phi, dtype=torch.float64))
    q = 1 / (1 + math.exp(-theta))
    p = [1 / (1 + math.exp(-x)) for x in phi]
    outcomes = [(c, n) for c in (True, False) for n in range(length)]  # n = length - 1: cut off
    groups = list(itertools.product(outcomes, repeat=g))
    correct = torch.tensor([c for group in groups for c, _ in group])
    num_work = torch.tensor([n for group in groups for _, n in group])
    weights = []
    for group in groups:
        prob = 1.0
        for c, n in group:
            pc = p[0] if (c or not sees) else p[1]
            prob *= (q if c else 1 - q) * ((1 - pc) ** n * pc if n < length - 1 else (1 - pc) ** n)
        weights.append(prob)
    logp, mask = policy.log_probs(correct, num_work, length)
    advantages = group_advantages(correct.to(torch.float64), g, config)
    scale = torch.tensor(weights, dtype=torch.float64).repeat_interleave(g) * len(groups)
    policy_loss(logp, None, advantages * scale, mask, config).loss.backward()
    assert sum(weights) == pytest.approx(1.0, abs=1e-13)
    return torch.cat([policy.theta.grad[None], policy.phi.grad]).numpy()


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("sees", [True, False])
def test_expected_gradient_equals_the_exhaustive_enumeration(arm, sees):
    g, length, theta = 3, 4, 0.4
    phi = [-0.3, 0.7] if sees else [0.2]
    got = expected_gradient(theta, phi, length, g, arm_config(arm, length))
    want = _enumerated_gradient(arm, sees, g, length, theta, phi)
    np.testing.assert_allclose(np.r_[got.theta, got.phi], want, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- ... and by Monte Carlo


def _monte_carlo(arm: str, sees: bool, batches: int = 60, groups: int = 128, seed: int = 0):
    g, length = 8, 16
    config = arm_config(arm, length)
    policy = StopPolicy(0.6, 0.3, sees)
    if sees:
        with torch.no_grad():
            policy.phi.copy_(torch.tensor([-0.5, -1.5], dtype=torch.float64))
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(batches):
        policy.zero_grad(set_to_none=True)
        correct, num_work = policy.sample(groups * g, length, generator)
        batch_gradient(policy, correct, num_work, g, length, config)
        grads.append(torch.cat([policy.theta.grad[None], policy.phi.grad]).numpy().copy())
    grads = np.array(grads)
    phi = policy.phi.detach().numpy()
    return grads.mean(0), grads.std(0, ddof=1) / math.sqrt(batches), policy.theta.item(), phi, g, length


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS)
def test_expected_gradient_matches_monte_carlo_when_the_stop_sees_correctness(arm):
    mean, se, theta, phi, g, length = _monte_carlo(arm, sees=True)
    config = arm_config(arm, length)
    want = expected_gradient(theta, phi, length, g, config)
    z = (mean - np.r_[want.theta, want.phi]) / se
    assert np.all(np.abs(z) < 4), z
    # a wrong formula fails: the other aggregation's stop pull, and 1/|o| counting the length without EOS
    other = {"grpo": "dr_grpo", "dr_grpo": "grpo", "grpo_no_std": "dr_grpo", "dr_grpo_std": "grpo"}[arm]
    wrong = expected_gradient(
        theta,
        phi,
        length,
        g,
        arm_config(other, length).replace(
            advantage_std=config.advantage_std, std_eps=config.std_eps, std_unbiased=config.std_unbiased
        ),
    )
    assert np.all(np.abs((mean[1:] - wrong.phi) / se[1:]) > 10)
    if config.aggregation == "seq-mean-token-mean":
        m = advantage_mass(1 / (1 + math.exp(-theta)), g, config)
        for k, mass in enumerate(m):
            prob, lengths, score = length_distribution(float(1 / (1 + np.exp(-phi[k]))), length)
            no_eos = -mass * float(np.sum(prob * score / np.maximum(lengths - 1, 1)))
            assert abs((mean[1 + k] - no_eos) / se[1 + k]) > 10
        assert want.phi[0] < 0 < want.phi[1]  # SGD raises stop-after-right, lowers stop-after-wrong


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS)
def test_no_drift_in_expectation_when_the_stop_is_blind(arm):
    mean, se, theta, phi, g, length = _monte_carlo(arm, sees=False)
    want = expected_gradient(theta, phi, length, g, arm_config(arm, length))
    assert want.phi[0] == pytest.approx(0.0, abs=1e-15)
    assert abs(mean[1] / se[1]) < 4
    assert abs((mean[0] - want.theta) / se[0]) < 4
    # the test could see a drift: GRPO's pull on a stop that sees correctness is many standard errors
    seeing = expected_gradient(theta, [phi[0], phi[0]], length, g, arm_config("grpo", length))
    assert abs(seeing.phi[1]) > 20 * se[1]


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_sampled_training_follows_the_expected_flow():
    steps = 60
    grpo = train_policy(MechanismConfig(arm="grpo", steps=steps, seed=1))
    flow = expected_flow(MechanismConfig(arm="grpo", steps=steps))
    assert len(grpo.phi) == steps + 1 and grpo.phi[0] == flow.phi[0]
    # GRPO: the stop logit after a wrong answer falls, the one after a right answer rises, as the flow says
    assert flow.phi[-1][1] < flow.phi[0][1] - 1.0 and flow.phi[-1][0] > flow.phi[0][0] + 0.5
    np.testing.assert_allclose(grpo.phi[-1], flow.phi[-1], atol=0.25)
    assert flow.length_incorrect[-1] > flow.length_incorrect[0] + 3
    # Dr. GRPO: no expected pull, so the stop logits stay where they started up to the sampling noise
    dr = train_policy(MechanismConfig(arm="dr_grpo", steps=steps, seed=1))
    dr_flow = expected_flow(MechanismConfig(arm="dr_grpo", steps=steps))
    assert dr_flow.phi[-1] == dr_flow.phi[0]
    np.testing.assert_allclose(dr.phi[-1], dr.phi[0], atol=0.1)
    assert dr.accuracy[-1] > dr.accuracy[0]  # while the answer is learned
    assert (
        train_policy(MechanismConfig(arm="grpo", steps=5, seed=3)).phi
        == train_policy(MechanismConfig(arm="grpo", steps=5, seed=3)).phi
    )  # deterministic per seed


# --------------------------------------------------------------------------- bad input


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="arm must be one of"):
        arm_config("dapo", 16)
    with pytest.raises(ValueError, match=r"MechanismConfig.arm must be one of .* got 'drgrpo'"):
        MechanismConfig(arm="drgrpo")
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        length_distribution(0.5, 1)
    with pytest.raises(ValueError, match=r"p_stop must be a probability strictly between 0 and 1, got 1\.0"):
        length_distribution(1.0, 8)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        advantage_mass(0.5, 1, arm_config("grpo", 8))
    with pytest.raises(ValueError, match="advantage_std='batch'"):
        advantage_mass(0.5, 4, arm_config("grpo", 8).replace(advantage_std="batch"))
    with pytest.raises(ValueError, match="aggregation must be 'seq-mean-token-mean'"):
        stop_pull(0.5, 8, arm_config("grpo", 8).replace(aggregation="token-mean"))
    with pytest.raises(ValueError, match=r"phi must have shape \(2,\)"):
        expected_gradient(0.0, [0.0, 0.0, 0.0], 8, 4, arm_config("grpo", 8))
    with pytest.raises(ValueError, match=r"MechanismConfig\.lr must be > 0"):
        MechanismConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"MechanismConfig\.group_size must be >= 2"):
        MechanismConfig(group_size=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--batches", "1"], "--batches must be at least 2, got 1"),
    ],
)
def test_the_figures_script_refuses_a_bad_size_before_writing(tmp_path, monkeypatch, capsys, args, message):
    # docs/length-bias/mechanism.py: a usage error (exit 2, one line naming the flag), and no output directory
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "length-bias" / "mechanism.py"
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", [str(script), "--out-dir", str(out), *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"mechanism.py: error: {message}"
    assert not out.exists()
