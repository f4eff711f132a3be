"""Split invariance (docs/design.md, section 6): K uneven micro-batches with a StepNormalizer give the whole
batch's gradient.

The oracles are independent of the machinery under test: the gradient of the whole batch's loss
(one ``policy_loss`` call with its own counts, no normalizer) and the float64 numpy reference
``drgrpo.reference.oracle_policy_loss`` given the step's global counts.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from drgrpo import LossConfig, StepNormalizer, group_advantages, policy_loss, reference, token_weights
from drgrpo.config import AGGREGATIONS
from helpers.normalizer_steps import (
    L,
    Micro,
    Step,
    aggregation_config,
    gradients,
    make_model,
    make_step,
    max_diff,
    micro_loss,
    preset_config,
    token_logp,
    uneven_split,
    whole,
    whole_batch,
)

PRESETS = ("dr_grpo", "grpo", "dapo", "gspo", "cispo")
GRAD_TOL = 1e-12


# --------------------------------------------------------------------------- data: a tiny model and one step


def step_for(config: LossConfig, seed: int, **kwargs) -> Step:
    # GSPO clips a sequence-level ratio at 1 +- 3e-4: keep ratios that close so some tokens carry gradient.
    return make_step(seed, ratio_scale=2e-4 if config.ratio_level == "sequence" else 0.3, **kwargs)


def split_batch(step: Step, config: LossConfig, micros: list[Micro]) -> tuple[list[Tensor], list[Tensor]]:
    """Gradient accumulation: one normalizer for the step, backward per micro-batch."""
    model = make_model(step.model_seed)
    adv = group_advantages(step.rewards, step.group_size, config)
    norm = StepNormalizer.from_masks([step.mask(m.rows, m.width) for m in micros], config)
    losses = []
    for m in micros:
        loss = micro_loss(model, step, m, adv, config, norm)
        loss.backward()
        losses.append(loss.detach())
    return losses, gradients(model)


def reference_loss(step: Step, config: LossConfig, micro: Micro, num_tokens: float, num_sequences: float) -> float:
    """The float64 numpy oracle on one micro-batch with the step's global counts."""
    r, t = micro.rows, micro.width
    with torch.no_grad():
        logp = token_logp(make_model(step.model_seed), step.x[r, :t], step.y[r, :t])
    adv = reference.config_advantages(step.rewards.numpy(), step.group_size, config)[r]
    return reference.oracle_policy_loss(
        logp.numpy(),
        step.old_logp[r, :t].numpy(),
        adv,
        step.mask(r, t).numpy(),
        config,
        step.ref_logp[r, :t].numpy() if config.beta > 0 else None,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
    )


CASES = [pytest.param(aggregation_config(a), id=a) for a in AGGREGATIONS] + [
    pytest.param(preset_config(p), id=f"preset-{p}") for p in PRESETS
]


# --------------------------------------------------------------------------- split invariance


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("config", CASES)
def test_uneven_micro_batches_give_the_whole_batch_gradient(config: LossConfig, k: int) -> None:
    step = step_for(config, seed=10 + k)
    micros = uneven_split(step, k, seed=k)
    if k > 1:
        assert len({m.rows.stop - m.rows.start for m in micros}) > 1  # uneven sizes
        assert len({m.width for m in micros}) == k  # a different T per micro-batch
    whole_loss, whole_grad = whole_batch(step, config)
    losses, split_grad = split_batch(step, config, micros)

    assert max(float(gr.abs().max()) for gr in whole_grad) > 1e-3  # the gradient carries signal
    assert max_diff(split_grad, whole_grad) <= GRAD_TOL
    assert abs(float(sum(losses)) - float(whole_loss)) <= GRAD_TOL

    # Each micro-batch's loss is its share of the step's objective: the numpy oracle with global counts.
    num_tokens = float(sum(step.mask(m.rows, m.width).sum() for m in micros))
    shares = [reference_loss(step, config, m, num_tokens, step.num_rows) for m in micros]
    for loss, share in zip(losses, shares):
        assert abs(float(loss) - share) <= 1e-12
    assert abs(sum(shares) - reference_loss(step, config, whole(step), None, None)) <= 1e-12


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 4),
    aggregation=st.sampled_from(AGGREGATIONS),
    ratio_level=st.sampled_from(["token", "sequence"]),
    surrogate=st.sampled_from(["ppo", "cispo", "sapo"]),
    num_groups=st.integers(2, 4),
    group_size=st.integers(1, 4),
)
def test_split_invariance_property(
    seed: int, k: int, aggregation: str, ratio_level: str, surrogate: str, num_groups: int, group_size: int
) -> None:
    if num_groups * group_size < k:
        k = num_groups * group_size
    config = LossConfig(
        surrogate=surrogate,
        ratio_level=ratio_level,
        clip_low=0.2 if surrogate != "cispo" else None,
        aggregation=aggregation,
        max_completion_length=L,
        advantage_std="batch",
        beta=0.02,
        kl="k2",
    )
    step = make_step(seed, num_groups=num_groups, group_size=group_size, ratio_scale=0.05)
    micros = uneven_split(step, k, seed=seed)
    _, whole_grad = whole_batch(step, config)
    _, split_grad = split_batch(step, config, micros)
    assert max_diff(split_grad, whole_grad) <= GRAD_TOL


NAIVE_CASES = [pytest.param(aggregation_config(a), id=a) for a in ("token-mean", "seq-mean-token-mean")] + [
    pytest.param(preset_config(p), id=f"preset-{p}") for p in ("dr_grpo", "grpo", "dapo")
]


@pytest.mark.parametrize("config", NAIVE_CASES)
def test_naive_per_micro_batch_normalisation_is_a_different_gradient(config: LossConfig) -> None:
    # What TRL/verl users hit: each micro-batch normalised by its own counts, losses averaged over K.
    step = step_for(config, seed=3)
    micros = uneven_split(step, 3, seed=5)
    _, whole_grad = whole_batch(step, config)
    _, split_grad = split_batch(step, config, micros)
    model = make_model(step.model_seed)
    adv = group_advantages(step.rewards, step.group_size, config)
    for m in micros:
        (micro_loss(model, step, m, adv, config) / len(micros)).backward()
    naive_grad = gradients(model)

    scale = max(float(gr.abs().max()) for gr in whole_grad)
    assert max_diff(naive_grad, whole_grad) > 1e-3 * scale  # naive: a different objective
    assert max_diff(split_grad, whole_grad) <= GRAD_TOL  # same data, with the normalizer: exact


# --------------------------------------------------------------------------- the normalizer itself


def test_from_masks_counts_tokens_and_sequences_of_all_micro_batches() -> None:
    masks = [
        torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool),
        torch.tensor([[1, 1, 1, 1, 1]], dtype=torch.int64),
        torch.tensor([[0.0], [1.0], [0.0]]),
    ]
    norm = StepNormalizer.from_masks(masks, preset_config("dr_grpo"))
    assert int(norm.num_tokens) == 3 + 5 + 1
    assert int(norm.num_sequences) == 2 + 1 + 3
    assert isinstance(norm.num_tokens, Tensor) and norm.num_tokens.dim() == 0
    assert norm.num_tokens.device == masks[0].device
    assert norm.max_completion_length == L
    assert norm.world_size == 1  # no process group initialised
    single = StepNormalizer.from_masks(masks[1], preset_config("dapo"))
    assert (int(single.num_tokens), int(single.num_sequences)) == (5, 1)


def test_from_masks_with_no_real_token_gives_zero_weights_not_nan() -> None:
    config = preset_config("dapo")
    mask = torch.zeros(2, 3)
    norm = StepNormalizer.from_masks([mask], config)
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss = policy_loss(logp, None, torch.ones(2, dtype=torch.float64), mask, config, normalizer=norm).loss
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))


def test_ddp_average_false_keeps_world_size_one() -> None:
    norm = StepNormalizer.from_masks([torch.ones(1, 2)], preset_config("dapo"), ddp_average=False)
    assert norm.world_size == 1


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ([], "empty"),
        ([torch.ones(3)], "2-D"),
        ([torch.ones(2, 2), "mask"], "torch.Tensor"),
    ],
)
def test_from_masks_rejects_bad_masks(masks: list, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        StepNormalizer.from_masks(masks, preset_config("dapo"))


@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum-norm", "token-sum-norm"])
def test_from_masks_needs_a_constant_length(aggregation: str) -> None:
    # token-sum-norm without L divides by each call's padded width: per-call by definition.
    with pytest.raises(ValueError, match="max_completion_length"):
        StepNormalizer.from_masks([torch.ones(2, 2)], LossConfig(aggregation=aggregation))


@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum-norm", "token-sum-norm"])
def test_hand_built_normalizer_needs_a_constant_length_too(aggregation: str) -> None:
    # the same refusal as from_masks, at the one place that divides (token_weights)
    norm = StepNormalizer(num_tokens=4.0, num_sequences=2.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        token_weights(torch.ones(2, 2), LossConfig(aggregation=aggregation), norm)
    weights = token_weights(torch.ones(2, 2), LossConfig(aggregation=aggregation, max_completion_length=5), norm)
    expected = 1 / (2 * 5) if aggregation == "seq-mean-token-sum-norm" else 1 / 5
    torch.testing.assert_close(weights, torch.full((2, 2), expected))


def test_normalizer_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="world_size"):
        StepNormalizer(num_tokens=3.0, num_sequences=1.0, world_size=0)
    with pytest.raises(ValueError, match="num_tokens"):
        StepNormalizer(num_tokens=0.0, num_sequences=1.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        StepNormalizer(num_tokens=1.0, num_sequences=1.0, max_completion_length=0)


def test_world_size_undoes_the_ddp_average() -> None:
    # P processes, each holding the whole batch: DDP averages P identical gradients, so the
    # per-process gradient must be P times its share; token_weights applies that factor.
    config = preset_config("dapo")
    step = make_step(1)
    micro = whole(step)
    adv = group_advantages(step.rewards, step.group_size, config)
    model = make_model(step.model_seed)
    mask = step.mask(micro.rows, micro.width)
    base = StepNormalizer.from_masks([mask], config)
    scaled = StepNormalizer(base.num_tokens, base.num_sequences, base.max_completion_length, world_size=3)
    one = micro_loss(model, step, micro, adv, config, base)
    three = micro_loss(model, step, micro, adv, config, scaled)
    assert abs(float(three.detach()) - 3 * float(one.detach())) <= 1e-12


# --------------------------------------------------------------------------- presets defined per call


def test_per_call_config_refuses_a_normalizer() -> None:
    config = LossConfig(aggregation="token-mean", per_call_normalization=True, name="peer.per_call")
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="per call"):
        StepNormalizer.from_masks([mask], config)
    norm = StepNormalizer(num_tokens=torch.tensor(6), num_sequences=torch.tensor(2))
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="per call"):
        policy_loss(logp, None, torch.ones(2, dtype=torch.float64), mask, config, normalizer=norm)
    # Without a normalizer it is an ordinary per-call loss.
    policy_loss(logp, None, torch.ones(2, dtype=torch.float64), mask, config)


def test_registered_per_call_presets_refuse_a_normalizer_and_say_so() -> None:
    from drgrpo.config import _PRESETS, preset_names

    per_call = [n for n in preset_names() if _PRESETS[n]().per_call_normalization]
    for name in per_call:
        config = _PRESETS[name]()
        if config.aggregation == "seq-mean-token-sum-norm" and config.max_completion_length is None:
            config = config.replace(max_completion_length=L)
        with pytest.raises(ValueError, match="per call"):
            StepNormalizer.from_masks([torch.ones(1, 2)], config)
        # The preset's docstring (or its comment) must say so.
        text = ((_PRESETS[name].__doc__ or "") + inspect.getsource(_PRESETS[name])).lower()
        assert "micro-batch" in text or "per call" in text, f"preset {name!r} must document that it is per call"


# --------------------------------------------------------------------------- the fused path


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("config", CASES)
def test_fused_loss_with_a_normalizer_gives_the_whole_batch_gradient(config: LossConfig, k: int) -> None:
    fused = pytest.importorskip("drgrpo.fused")
    step = step_for(config, seed=20 + k)
    micros = uneven_split(step, k, seed=k + 7)
    _, whole_grad = whole_batch(step, config)  # the oracle: unfused, whole batch, its own counts
    model = make_model(step.model_seed)
    adv = group_advantages(step.rewards, step.group_size, config)
    norm = StepNormalizer.from_masks([step.mask(m.rows, m.width) for m in micros], config)
    for m in micros:
        r, t = m.rows, m.width
        out = fused.fused_policy_loss(
            step.x[r, :t],
            model.weight,
            step.y[r, :t],
            step.mask(r, t),
            adv[r],
            config,
            old_logp=step.old_logp[r, :t],
            ref_logp=step.ref_logp[r, :t] if config.beta > 0 else None,
            bias=model.bias,
            chunk_size=4,
            normalizer=norm,
        )
        out.loss.backward()
    assert max_diff(gradients(model), whole_grad) <= GRAD_TOL
