"""The sampler correction (vLLM's log-probs) and the off-policy sequence mask: against the float64 oracle, by hand,
finite differences, the fused path, and split invariance (K micro-batches, P processes)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from batches import random_batch
from drgrpo import LossConfig, StepNormalizer, group_advantages, policy_loss
from drgrpo import reference as ref
from drgrpo.correction import SAMPLING_CORRECTIONS, sampling_weight
from drgrpo.fused import fused_policy_loss
from helpers import fused_batches
from helpers.normalizer_steps import (
    L,
    gradients,
    make_model,
    make_step,
    max_diff,
    token_logp,
    uneven_split,
    whole,
)

PRESETS = ("dr_grpo", "grpo", "dapo", "gspo", "cispo", "sapo")
NAN = float("nan")


def preset(name: str, **overrides) -> LossConfig:
    return LossConfig.preset(name, max_completion_length=L, **overrides)


def sampler_logp(logp: torch.Tensor, mask: torch.Tensor, seed: int, scale: float = 0.3) -> torch.Tensor:
    """The sampler's log-probs: ``logp`` plus noise, NaN at two real tokens (not scored) and on padding."""
    g = torch.Generator().manual_seed(seed)
    s = logp + scale * torch.randn(logp.shape, generator=g, dtype=logp.dtype)
    real = mask.bool().nonzero()
    for k in (0, len(real) // 2):
        s[tuple(real[k])] = NAN
    return torch.where(mask.bool(), s, torch.full_like(s, NAN))


def oracle(batch, config, adv, sampling, beta_ref=True):
    return ref.oracle_policy_loss(
        batch.logp.double().numpy(),
        batch.old_logp.double().numpy(),
        adv.double().numpy(),
        batch.mask.double().numpy(),
        config,
        batch.ref_logp.double().numpy() if beta_ref else None,
        sampling_logp=sampling.double().numpy(),
    )


# --------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("mode", SAMPLING_CORRECTIONS)
@pytest.mark.parametrize("name", PRESETS)
def test_each_mode_and_preset_matches_the_oracle(mode, name):
    batch = random_batch(seed=31, empty_rows=1, ratio_scale=0.4)
    sampling = sampler_logp(batch.old_logp, batch.mask, seed=1, scale=0.3 if mode.startswith("token") else 0.1)
    config = preset(name, sampling_correction=mode, sampling_clip_min=0.8, sampling_clip_max=1.25, beta=0.05)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(
        batch.logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp, sampling_logp=sampling
    )
    assert out.loss.item() == pytest.approx(oracle(batch, config, adv, sampling), rel=1e-12, abs=1e-14)
    # not vacuous: some weights are at or beyond the bounds, some inside, and the loss differs from no correction
    rho = sampling_weight(batch.old_logp, sampling, batch.mask, mode, 0.8, 1.25)[batch.mask.bool()]
    assert ((rho == 0.8) | (rho == 1.25) | (rho == 0)).any() and ((rho > 0.8) & (rho < 1.25)).any()
    plain = policy_loss(
        batch.logp, batch.old_logp, adv, batch.mask, config.replace(sampling_correction=None), ref_logp=batch.ref_logp
    )
    assert out.loss.item() != pytest.approx(plain.loss.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
def test_vespo_folds_the_weight_and_matches_the_oracle(mode):
    batch = random_batch(seed=36, empty_rows=1, ratio_scale=0.1)
    sampling = sampler_logp(batch.old_logp, batch.mask, seed=6, scale=0.1)
    config = preset("trl.vespo", sampling_correction=mode, sampling_clip_min=0.9, sampling_clip_max=1.1, beta=0.05)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    kw = dict(ref_logp=batch.ref_logp, sampling_logp=sampling)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, **kw)
    assert out.loss.item() == pytest.approx(oracle(batch, config, adv, sampling), rel=1e-12, abs=1e-14)
    plain = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config.replace(sampling_correction=None), **kw)
    assert out.loss.item() != pytest.approx(plain.loss.item(), rel=1e-6)


@pytest.mark.parametrize("mode", [None, "token_truncate"])
def test_vespo_reports_phi_the_oracles_mean_over_completions(mode):
    """metrics["vespo_phi_mean"]: phi(w_i) averaged over the B completions (an empty one has w = 1, phi = 1)."""
    batch = random_batch(seed=37, empty_rows=1, ratio_scale=0.1)
    sampling = sampler_logp(batch.old_logp, batch.mask, seed=7, scale=0.1)
    config = preset("trl.vespo", sampling_correction=mode, sampling_clip_min=0.9, sampling_clip_max=1.1)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, sampling_logp=sampling)
    _, rows = ref.oracle_rows(
        batch.logp.double().numpy(),
        batch.old_logp.double().numpy(),
        adv.double().numpy(),
        batch.mask.double().numpy(),
        config,
        sampling.double().numpy(),
    )
    phis = [ref.vespo_phi(row, config) for row in rows]
    assert not all(row.tokens for row in rows) and max(abs(p - 1) for p in phis) > 0.05  # an empty row; phi moves
    assert out.metrics["vespo_phi_mean"].item() == pytest.approx(sum(phis) / len(phis), rel=1e-12)
    plain = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, preset("dapo"))
    assert "vespo_phi_mean" not in plain.metrics


def test_vespo_refuses_a_sequence_correction():
    with pytest.raises(ValueError, match="surrogate 'vespo' folds the sampler correction into its weight token by"):
        LossConfig(surrogate="vespo", sampling_correction="sequence_mask")


@pytest.mark.parametrize("threshold", [-0.05, 0.0, 0.1])
@pytest.mark.parametrize("name", PRESETS)
def test_off_policy_mask_matches_the_oracle(name, threshold):
    batch = random_batch(seed=32, empty_rows=1, ratio_scale=0.4)
    sampling = sampler_logp(batch.old_logp, batch.mask, seed=2)
    config = preset(name, off_policy_mask_threshold=threshold, beta=0.05)
    adv = group_advantages(batch.rewards, batch.group_size, config)
    for s in (sampling, None):  # the sampler's log-probs, else old_logp
        out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp, sampling_logp=s)
        expected = oracle(batch, config, adv, batch.old_logp if s is None else s)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    if threshold == 0.0:  # not vacuous: it drops some negative-advantage rows and keeps others
        keep = [
            ref.oracle_off_policy_keep(float(a), batch.logp[i, :n].tolist(), sampling[i, :n].tolist(), threshold)
            for i, (a, n) in enumerate(zip(adv, batch.mask.sum(1).int().tolist()))
            if a < 0
        ]
        assert True in keep and False in keep


def test_off_policy_mask_drops_exactly_the_negative_advantage_rows_above_the_threshold():
    # Row 0: A < 0, mean gap (sampling - logp) = (0.3 + 0.1) / 2 = 0.2 > 0.15: dropped.
    # Row 1: A < 0, gap 0.1 <= 0.15: kept. Row 2: A > 0, gap 0.5: kept (positive advantages always are).
    # Row 3: A < 0, a NaN gap counts as 0: (0 + 0.2) / 2 = 0.1: kept.
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0], [-0.5, -0.5], [-1.0, -1.0]], dtype=torch.float64)
    sampling = logp + torch.tensor([[0.3, 0.1], [0.1, 0.1], [0.5, 0.5], [NAN, 0.2]], dtype=torch.float64)
    adv = torch.tensor([-1.0, -1.0, 1.0, -2.0], dtype=torch.float64)
    mask = torch.ones(4, 2)
    config = LossConfig(aggregation="token-sum", off_policy_mask_threshold=0.15)
    lp = logp.clone().requires_grad_(True)
    out = policy_loss(lp, None, adv, mask, config, sampling_logp=sampling)
    (grad,) = torch.autograd.grad(out.loss, lp)
    # on-policy ratio 1, token-sum: d loss / d logp_t = -A on kept rows, 0 on the dropped one
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    assert out.loss.item() == pytest.approx(-(-2.0 + 2.0 - 4.0), rel=1e-15)


def test_correction_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0]], dtype=torch.float64)
    sampling = torch.tensor([[-1.5, NAN, 0.5, 7.0]], dtype=torch.float64)  # d = 0.5, 0 (NaN), -1.0; padding
    mask = torch.tensor([[1, 1, 1, 0]])
    e = math.exp
    cases = {
        ("token_truncate", 0.5, 1.5): [1.5, 1.0, 0.5, 1.0],  # e^0.5 = 1.65 -> 1.5; e^-1 = 0.37 -> 0.5
        ("token_mask", 0.5, 1.5): [0.0, 1.0, 0.0, 1.0],
        ("token_mask", None, 2.0): [e(0.5), 1.0, e(-1.0), 1.0],
        ("sequence_truncate", 0.7, 3.0): [0.7] * 4,  # e^(0.5 + 0 - 1) = 0.61 -> 0.7
        ("sequence_mask", 0.7, 3.0): [0.0] * 4,
        ("sequence_mask", None, 3.0): [e(-0.5)] * 4,
    }
    for (mode, low, high), expected in cases.items():
        rho = sampling_weight(old, sampling, mask, mode, low, high)
        torch.testing.assert_close(rho, torch.tensor([expected], dtype=torch.float64), rtol=1e-15, atol=0)
        real = [0, 1, 2]
        assert ref.sampling_weights(
            old[0, real].tolist(), sampling[0, real].tolist(), mode, low, high
        ) == pytest.approx(expected[:3], rel=1e-15)


def test_a_token_the_sampler_could_not_score_counts_as_no_difference():
    batch = random_batch(seed=33, ratio_scale=0.3)
    sampling = batch.old_logp + 0.2 * torch.randn_like(batch.old_logp)
    with_nan = sampling.clone()
    with_nan[0, 0] = NAN
    same = sampling.clone()
    same[0, 0] = batch.old_logp[0, 0]  # d = 0 there
    for mode in SAMPLING_CORRECTIONS:
        config = LossConfig(aggregation="token-mean", sampling_correction=mode, sampling_clip_min=0.5)
        adv = group_advantages(batch.rewards, batch.group_size, config)
        a = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, sampling_logp=with_nan)
        b = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config, sampling_logp=same)
        assert torch.isfinite(a.loss) and a.loss.item() == b.loss.item()


def test_metrics_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    sampling = torch.tensor([[-1.5, NAN, 0.5], [-0.8, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    config = LossConfig(aggregation="token-mean", sampling_correction="token_truncate", sampling_clip_min=0.5)
    m = policy_loss(old.clone(), old, adv, mask, config, sampling_logp=sampling).metrics
    # |d| over scored real tokens: 0.5, 1.0, 0.2 (the NaN token is left out, padding too)
    assert m["sampling_logp_difference_mean"].item() == pytest.approx(1.7 / 3, rel=1e-15)
    assert m["sampling_logp_difference_max"].item() == 1.0
    # token weights on real tokens: e^0.5, 1 (NaN -> d = 0), max(e^-1, 0.5) = 0.5, e^-0.2
    rho = [math.exp(0.5), 1.0, 0.5, math.exp(-0.2)]
    assert m["importance_sampling_ratio_min"].item() == 0.5
    assert m["importance_sampling_ratio_max"].item() == pytest.approx(math.exp(0.5), rel=1e-15)
    assert m["importance_sampling_ratio_mean"].item() == pytest.approx(sum(rho) / 4, rel=1e-15)
    # sequence modes: one weight per completion: e^(0.5 + 0 - 1) and e^-0.2
    seq = config.replace(sampling_correction="sequence_truncate")
    m = policy_loss(old.clone(), old, adv, mask, seq, sampling_logp=sampling).metrics
    assert m["importance_sampling_ratio_min"].item() == pytest.approx(math.exp(-0.5), rel=1e-15)
    assert m["importance_sampling_ratio_mean"].item() == pytest.approx((math.exp(-0.5) + math.exp(-0.2)) / 2)
    # without a correction: the difference only
    m = policy_loss(old.clone(), old, adv, mask, LossConfig(aggregation="token-mean"), sampling_logp=sampling).metrics
    assert "importance_sampling_ratio_mean" not in m and m["sampling_logp_difference_max"].item() == 1.0


@pytest.mark.parametrize("mode", SAMPLING_CORRECTIONS)
@pytest.mark.parametrize("surrogate", ["ppo", "sapo"])
def test_gradcheck_with_correction_and_off_policy_mask(mode, surrogate):
    batch = random_batch(seed=34, ratio_scale=0.5, empty_rows=1)
    sampling = sampler_logp(batch.old_logp, batch.mask, seed=3, scale=0.2)
    config = LossConfig(
        surrogate=surrogate,
        aggregation="token-mean",
        sampling_correction=mode,
        sampling_clip_min=0.7,
        sampling_clip_max=1.3,
        off_policy_mask_threshold=0.0,
        beta=0.1,
    )
    adv = group_advantages(batch.rewards, batch.group_size, config)

    def f(logp):
        return policy_loss(
            logp, batch.old_logp, adv, batch.mask, config, ref_logp=batch.ref_logp, sampling_logp=sampling
        ).loss

    assert torch.autograd.gradcheck(f, (batch.logp.clone().requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(sampling_correction="tokens"), "sampling_correction must be one of 'token_truncate', 'token_mask', "),
        (
            dict(sampling_clip_min=2.0, sampling_clip_max=1.0),
            "sampling_clip_min must be below sampling_clip_max, got 2.0",
        ),
        (dict(sampling_clip_min=-1.0), "sampling_clip_min must be >= 0, got -1.0"),
        (
            dict(sampling_correction="sequence_truncate", sampling_clip_max=None),
            "sampling_correction 'sequence_truncate' clamps the weight: set sampling_clip_min or sampling_clip_max",
        ),
        (dict(off_policy_mask_threshold=math.inf), "off_policy_mask_threshold must be finite, got inf"),
    ],
)
def test_bad_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        LossConfig(**fields)


def test_a_correction_without_the_samplers_logp_is_refused():
    batch = random_batch(seed=35)
    config = LossConfig(aggregation="token-mean", sampling_correction="token_mask")
    with pytest.raises(ValueError, match=r"sampling_correction='token_mask' needs sampling_logp \(B, T\)"):
        policy_loss(batch.logp, batch.old_logp, batch.rewards, batch.mask, config)
    with pytest.raises(ValueError, match=r"sampling_logp must have shape \(B, T\)"):
        policy_loss(batch.logp, batch.old_logp, batch.rewards, batch.mask, config, sampling_logp=batch.logp[:, :2])


# --------------------------------------------------------------------------- fused


@pytest.mark.parametrize("mode", [*SAMPLING_CORRECTIONS, None])
@pytest.mark.parametrize("name", ["dr_grpo", "gspo", "cispo"])
def test_fused_matches_the_logits_path(mode, name, monkeypatch):
    d = fused_batches.make(seed=4)
    config = preset(
        name, sampling_correction=mode, sampling_clip_min=0.9, sampling_clip_max=1.1, off_policy_mask_threshold=0.0
    )
    sampling = sampler_logp(d["old"], d["mask"], seed=5, scale=0.1)
    # fused_batches.check: the comparison (loss, gradients, log-probs, metrics) with sampling_logp passed to both paths
    monkeypatch.setattr(fused_batches, "policy_loss", lambda *a, **k: policy_loss(*a, sampling_logp=sampling, **k))
    monkeypatch.setattr(
        fused_batches, "fused_policy_loss", lambda *a, **k: fused_policy_loss(*a, sampling_logp=sampling, **k)
    )
    for chunk_size in (3, 100):
        fused_batches.check(d, config, 1e-12, chunk_size=chunk_size)


# --------------------------------------------------------------------------- split invariance


def split_cases() -> list:
    cases = []
    for name in ("dr_grpo", "grpo", "dapo", "gspo"):
        for mode in SAMPLING_CORRECTIONS:
            cases.append(
                pytest.param(preset(name, sampling_correction=mode, sampling_clip_min=0.8), id=f"{name}-{mode}")
            )
        cases.append(pytest.param(preset(name, off_policy_mask_threshold=0.0), id=f"{name}-off-policy"))
    vespo = LossConfig(surrogate="vespo", aggregation="token-mean", advantage_std="group", std_eps=1e-6)
    cases.append(pytest.param(vespo.replace(sampling_correction="token_truncate", sampling_clip_min=0.8), id="vespo"))
    cases.append(
        pytest.param(
            preset("dapo", sampling_correction="sequence_mask", sampling_clip_min=0.5, off_policy_mask_threshold=0.0),
            id="dapo-both",
        )
    )
    return cases


def _sampling_for(step) -> torch.Tensor:
    width = step.old_logp.shape[1]
    mask = (torch.arange(width).unsqueeze(0) < step.lengths.unsqueeze(1)).to(torch.float64)
    return sampler_logp(step.old_logp, mask, seed=7, scale=0.2)


def _loss(model, step, rows, width, adv, config, sampling, normalizer=None, fused=False):
    x, y = step.x[rows, :width], step.y[rows, :width]
    mask = step.mask(rows, width)
    ref_logp = step.ref_logp[rows, :width] if config.beta > 0 else None
    kw = dict(ref_logp=ref_logp, sampling_logp=sampling[rows, :width], normalizer=normalizer)
    if fused:
        return fused_policy_loss(
            x, model.weight, y, mask, adv[rows], config, old_logp=step.old_logp[rows, :width], bias=model.bias,
            chunk_size=3, **kw,
        ).loss  # fmt: skip
    return policy_loss(token_logp(model, x, y), step.old_logp[rows, :width], adv[rows], mask, config, **kw).loss


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("config", split_cases())
def test_micro_batches_and_processes_give_the_whole_batch_gradient(config, k):
    step = make_step(40 + k, ratio_scale=2e-4 if config.ratio_level == "sequence" else 0.3)
    sampling = _sampling_for(step)
    adv = group_advantages(step.rewards, step.group_size, config)
    model = make_model(step.model_seed)
    w = whole(step)
    _loss(model, step, w.rows, w.width, adv, config, sampling).backward()
    whole_grad = gradients(model)
    assert max(float(g.abs().max()) for g in whole_grad) > 1e-3

    micros = uneven_split(step, k, seed=k)
    norm = StepNormalizer.from_masks([step.mask(m.rows, m.width) for m in micros], config)
    for fused in (False, True):
        model = make_model(step.model_seed)
        for m in micros:
            _loss(model, step, m.rows, m.width, adv, config, sampling, norm, fused=fused).backward()
        assert max_diff(gradients(model), whole_grad) <= 1e-12, f"K = {k}, fused = {fused}"

    # P = 2 processes, each with its own micro-batches: DDP averages their gradients, the normaliser's world size
    # (2) undoes the average.
    halves = [micros[: max(1, len(micros) // 2)], micros[max(1, len(micros) // 2) :]]
    if all(halves):
        norm = dataclasses.replace(norm, world_size=2)
        per_rank = []
        for rank_micros in halves:
            model = make_model(step.model_seed)
            for m in rank_micros:
                _loss(model, step, m.rows, m.width, adv, config, sampling, norm).backward()
            per_rank.append(gradients(model))
        averaged = [(a + b) / 2 for a, b in zip(*per_rank)]
        assert max_diff(averaged, whole_grad) <= 1e-12
