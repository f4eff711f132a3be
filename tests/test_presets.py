"""The core presets hold the choices their papers state."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

import drgrpo
from drgrpo import LossConfig

CORE = {"dr_grpo", "grpo", "dapo", "bnpo", "gspo", "cispo", "sapo", "seed"}


def test_presets_are_registered():
    assert set(drgrpo.preset_names()) >= CORE


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "dr_grpo",
            dict(
                advantage_std="none",
                aggregation="seq-mean-token-sum-norm",
                beta=0.0,
                clip_low=0.2,
                clip_high=0.2,
                surrogate="ppo",
            ),
        ),
        ("grpo", dict(advantage_std="group", aggregation="seq-mean-token-mean", kl="k3", beta=0.04)),
        ("dapo", dict(clip_low=0.2, clip_high=0.28, aggregation="token-mean", beta=0.0)),
        ("bnpo", dict(aggregation="token-mean")),
        ("gspo", dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4)),
        ("cispo", dict(surrogate="cispo", clip_low=None)),
        ("sapo", dict(surrogate="sapo")),
        (
            "seed",
            dict(
                advantage_std="group",
                std_unbiased=False,
                std_eps=0.0,
                std_zero_threshold=1e-8,
                kl="k1",
                beta=0.04,
                clip_low=0.2,
                clip_high=0.2,
            ),
        ),
    ],
)
def test_preset_fields(name, expected):
    config = LossConfig.preset(name, max_completion_length=64)
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert config.name == name


def test_overrides_use_field_names_and_configs_are_frozen():
    config = LossConfig.preset("grpo", clip_high=0.28, beta=0.0)
    assert (config.clip_high, config.beta) == (0.28, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.beta = 1.0  # type: ignore[misc]


def test_every_field_has_a_docstring():
    import ast
    import inspect

    source = inspect.getsource(LossConfig)
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    documented = {
        node.target.id
        for node, nxt in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
    }
    assert {f.name for f in dataclasses.fields(LossConfig)} <= documented


def test_public_names_import():
    for name in drgrpo.__all__:
        assert getattr(drgrpo, name) is not None
