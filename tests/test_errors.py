"""Every bad input gets a ValueError/TypeError that names the argument, what it got and what was expected."""

from __future__ import annotations

import re

import pytest
import torch

from drgrpo import LossConfig, group_advantages, policy_loss, preset_names, register_preset
from drgrpo import config as config_module
from drgrpo.config import preset_config

B, T = 4, 5


def inputs(**changes):
    args = {
        "logp": -torch.rand(B, T, dtype=torch.float64),
        "old_logp": -torch.rand(B, T, dtype=torch.float64),
        "advantages": torch.randn(B, dtype=torch.float64),
        "mask": torch.ones(B, T),
        "config": LossConfig(aggregation="token-mean"),
    }
    args.update(changes)
    return args


def call(**changes):
    args = inputs(**changes)
    ref = args.pop("ref_logp", None)
    return policy_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], args["config"], ref_logp=ref)


def bad_at(x, pos, value):
    x = x.clone()
    x[pos] = value
    return x


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"logp": -torch.rand(B * T)}, ValueError, "logp must be 2-D (B, T), got shape (20,)"),
        ({"logp": [[0.0]]}, TypeError, "logp must be a torch.Tensor, got list"),
        ({"logp": torch.zeros(B, T, dtype=torch.long)}, TypeError, "logp must be a floating-point tensor"),
        ({"old_logp": -torch.rand(B, T + 1)}, ValueError, "old_logp must have shape (B, T) = (4, 5), got (4, 6)"),
        ({"ref_logp": -torch.rand(T, B)}, ValueError, "ref_logp must have shape (B, T) = (4, 5), got (5, 4)"),
        ({"mask": torch.ones(B, 1)}, ValueError, "mask must have shape (B, T) = (4, 5), got (4, 1)"),
        ({"advantages": torch.randn(B, 1)}, ValueError, "advantages must have shape (B,) = (4,), got (4, 1)"),
        ({"advantages": torch.randn(B + 1)}, ValueError, "advantages must have shape (B,) = (4,), got (5,)"),
        (
            {"mask": bad_at(torch.ones(B, T), (2, 3), 0.5)},
            ValueError,
            "mask must contain only 0 and 1, got 0.5 at position (2, 3)",
        ),
        (
            {"logp": bad_at(-torch.rand(B, T, dtype=torch.float64), (1, 2), float("nan"))},
            ValueError,
            "logp has a non-finite value nan at position (1, 2)",
        ),
        (
            {"old_logp": bad_at(-torch.rand(B, T, dtype=torch.float64), (3, 0), float("-inf"))},
            ValueError,
            "old_logp has a non-finite value -inf at position (3, 0)",
        ),
        (
            {"advantages": bad_at(torch.randn(B, dtype=torch.float64), 2, float("inf"))},
            ValueError,
            "advantages has a non-finite value inf at position (2,)",
        ),
        ({"config": LossConfig(beta=0.1, aggregation="token-mean")}, ValueError, "config.beta=0.1 > 0 needs ref_logp"),
        (
            {"config": LossConfig(aggregation="seq-mean-token-sum-norm")},
            ValueError,
            "'seq-mean-token-sum-norm' divides by a constant L: set max_completion_length",
        ),
        ({"config": {"beta": 0}}, TypeError, "config must be a LossConfig, got dict"),
    ],
)
def test_policy_loss_errors(changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call(**changes)


@pytest.mark.parametrize("name", ["logp", "old_logp", "advantages", "mask", "ref_logp"])
@pytest.mark.parametrize("validate", [True, False])
def test_device_mismatch_names_the_argument_and_devices(name, validate):
    # the meta device stands for a second device on a machine without a GPU; checked even with validate=False
    args = inputs(ref_logp=-torch.rand(B, T, dtype=torch.float64))
    args[name] = args[name].to("meta")
    ref = args.pop("ref_logp")
    other, first = (name, "logp") if name != "logp" else ("mask", "logp")
    devices = ("meta", "cpu") if name != "logp" else ("cpu", "meta")
    message = f"{other} is on {devices[0]} but {first} is on {devices[1]}; move them to one device"
    with pytest.raises(ValueError, match=re.escape(message)):
        policy_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], args["config"], ref_logp=ref,
                    validate=validate)  # fmt: skip


def test_non_finite_values_on_padding_are_ignored():
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    logp = bad_at(-torch.rand(B, T, dtype=torch.float64), (1, 4), float("nan"))
    assert torch.isfinite(call(logp=logp, mask=mask).loss)


@pytest.mark.parametrize(
    ("rewards", "group_size", "error", "message"),
    [
        (torch.zeros(2, 3), 3, ValueError, "rewards must be 1-D (N,), got shape (2, 3)"),
        (torch.zeros(7), 2, ValueError, "N=7 must be a multiple of group_size=2"),
        (torch.zeros(4), 0, ValueError, "group_size must be >= 1, got 0"),
        (torch.zeros(4), 2.0, TypeError, "group_size must be an int, got float"),
        (torch.tensor([1.0, float("nan")]), 2, ValueError, "rewards has a non-finite value nan at position (1,)"),
    ],
)
def test_group_advantages_errors(rewards, group_size, error, message):
    with pytest.raises(error, match=re.escape(message)):
        group_advantages(rewards, group_size, LossConfig(advantage_std="group"))


def test_infinite_reward_is_an_error_even_when_nan_is_ignored():
    with pytest.raises(ValueError, match=re.escape("rewards has a non-finite value inf at position (0,)")):
        group_advantages(torch.tensor([float("inf"), 1.0]), 2, LossConfig(nan_rewards="ignore"))


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"clip_low": -0.1}, ValueError, "clip_low must be >= 0, got -0.1"),
        ({"clip_high": 0.0}, ValueError, "clip_high must be positive, got 0.0"),
        ({"clip_high": float("nan")}, ValueError, "clip_high must be finite, got nan"),
        ({"beta": -0.04}, ValueError, "beta must be >= 0, got -0.04"),
        ({"beta": "0.04"}, TypeError, "beta must be a number, got str"),
        ({"std_eps": -1e-4}, ValueError, "std_eps must be >= 0"),
        ({"dual_clip": 0.5}, ValueError, "dual_clip must be > 1"),
        ({"delta": 1.1}, ValueError, "delta must be > 1 + clip_high = 1.2, got 1.1"),
        ({"kl": "k4"}, ValueError, "kl must be one of 'k1', 'k2', 'k3', 'low_var_kl', 'abs'; got 'k4'"),
        ({"aggregation": "mean"}, ValueError, "aggregation must be one of"),
        ({"ratio_level": "seq"}, ValueError, "ratio_level must be one of 'token', 'sequence'; got 'seq'"),
        ({"max_completion_length": 0}, ValueError, "max_completion_length must be >= 1, got 0"),
        ({"max_completion_length": 12.5}, TypeError, "max_completion_length must be an int, got float"),
        ({"clip_low": None}, ValueError, "clip_low none (no lower clip) needs surrogate 'cispo', got 'ppo'"),
        ({"sapo_tau_neg": 0.0}, ValueError, "sapo_tau_neg must be positive"),
        (
            {"forced_aggregation": "seq-mean-token-mean", "aggregation": "token-mean", "beta": 0.1},
            ValueError,
            "drgrpo applies one rule to both; set aggregation to 'seq-mean-token-mean' or beta to 0",
        ),
    ],
)
def test_config_errors(fields, error, message):
    with pytest.raises(error, match=re.escape(message)):
        LossConfig(**fields)


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown preset 'drgrpo'; valid presets: .*dr_grpo.*grpo"):
        LossConfig.preset("drgrpo")


def test_forced_aggregation_with_kl_needs_the_same_aggregation():
    # one aggregation for both terms: accepted when they agree, or without a KL term
    LossConfig(forced_aggregation="seq-mean-token-mean", aggregation="seq-mean-token-mean", beta=0.1)
    LossConfig(forced_aggregation="seq-mean-token-mean", aggregation="token-mean", beta=0.0)


def test_preset_config_is_the_registered_preset_without_the_length_check():
    config = preset_config("dr_grpo")
    assert (config.name, config.max_completion_length, config.aggregation) == (
        "dr_grpo",
        None,
        "seq-mean-token-sum-norm",
    )
    assert preset_config("trl.bnpo").per_call_normalization
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; valid presets: .*dr_grpo"):
        preset_config("nope")


def test_dr_grpo_without_l_says_so():
    with pytest.raises(ValueError, match="pass max_completion_length=L"):
        LossConfig.preset("dr_grpo")
    assert LossConfig.preset("dr_grpo", max_completion_length=512).max_completion_length == 512


def test_unknown_override_lists_the_fields():
    with pytest.raises(ValueError, match=r"unknown LossConfig field\(s\) \['epsilon'\]; valid fields: surrogate"):
        LossConfig.preset("grpo", epsilon=0.3)


def test_registry_rejects_a_second_function_under_a_name():
    snapshot = dict(config_module._PRESETS)
    try:
        register_preset("test.tmp")(lambda: LossConfig(name="test.tmp"))
        assert "test.tmp" in preset_names()
        with pytest.raises(ValueError, match=r"a preset named 'test\.tmp' is already registered"):
            register_preset("test.tmp")(lambda: LossConfig())
    finally:
        config_module._PRESETS.clear()
        config_module._PRESETS.update(snapshot)
    assert "test.tmp" not in preset_names()
