"""``verl.*`` presets against verl 0.9.1 run live: loss and d loss / d logp in float64.

verl runs in its own environment (``.venv-verl``, see ``tests/verl_env.py``): its built-in loss modes
(``vanilla``, ``gspo``, ``cispo``, ``sapo``) go through verl's actor loss entry point
``verl.workers.utils.losses.ppo_loss`` for every ``loss_agg_mode`` and every KL type (``use_kl_loss``),
with the global counts of a mini-batch spread over two data-parallel ranks; its GRPO advantage estimator
runs with and without the std. Here the same inputs go through drgrpo's presets, with a
:class:`~drgrpo.normalizer.StepNormalizer` holding verl's ``global_batch_info``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drgrpo.advantages import group_advantages
from drgrpo.config import LossConfig
from drgrpo.loss import policy_loss
from drgrpo.normalizer import StepNormalizer
from verl_env import live

PEER = "verl 0.9.1 (live)"
PRESET = {"vanilla": "verl.vanilla", "gspo": "verl.gspo", "cispo": "verl.cispo", "sapo": "verl.sapo"}
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's kl_loss_type -> our kl; verl's "k3" is its clamped "low_var_kl" (kl_penalty_forward treats them alike)
KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl"}
KL_COEF = 0.05  # kl_loss_coef in the runner


def ours(batch: dict, config: LossConfig, normalizer: StepNormalizer | None = None, ref: bool = False):
    logp = batch["logp"].clone().requires_grad_()
    out = policy_loss(
        logp,
        batch["old"],
        batch["adv"],
        batch["mask"],
        config,
        ref_logp=batch["ref"] if ref else None,
        normalizer=normalizer,
    )
    out.loss.backward()
    return out.loss.detach(), logp.grad


def normalizer_of(info: dict, length: int | None = None) -> StepNormalizer:
    """verl's global_batch_info as a step normaliser: the same counts, dp_size undoing FSDP's average."""
    return StepNormalizer(
        num_tokens=info["batch_num_tokens"],
        num_sequences=info["global_batch_size"],
        max_completion_length=length,
        world_size=info["dp_size"],
    )


def check(record, preset, quantity, got, expected, rtol=1e-13):
    record(preset, PEER, quantity, got, expected)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-15 * float(expected.abs().max()) + 1e-300)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", list(PRESET))
def test_builtin_loss_modes_every_aggregation_and_kl(mode, agg, record):
    block = live()["builtin"][0]
    batch, info = block["batch"], block["info"]
    cases = [c for c in block["cases"] if c["mode"] == mode and c["agg"] == agg]
    assert len(cases) == (16 if agg == "seq-mean-token-sum-norm" else 8)  # 8 KL settings (x 2 L's)
    for case in cases:
        # verl's L: loss_scale_factor, or the padded width of the call when unset (here one call: a constant)
        length = (case["scale"] or batch["mask"].shape[1]) if agg == "seq-mean-token-sum-norm" else None
        overrides = {"aggregation": agg, "max_completion_length": length}
        if case["kl"] is not None:
            overrides.update(beta=KL_COEF, kl=KL[case["kl"]])
        if mode == "sapo" and case["kl"] is not None and agg != "seq-mean-token-mean":
            # verl aggregates sapo's surrogate with seq-mean-token-mean and its KL with loss_agg_mode:
            # one aggregation per loss here, so that combination is refused, not approximated
            with pytest.raises(ValueError, match="forced_aggregation"):
                LossConfig.preset(PRESET[mode], **overrides)
            continue
        config = LossConfig.preset(PRESET[mode], **overrides)
        loss, grad = ours(batch, config, normalizer_of(info, length), ref=case["kl"] is not None)
        label = "" if case["kl"] is None else ", KL"
        check(record, PRESET[mode], f"loss{label} (fp64)", loss, case["loss"])
        check(record, PRESET[mode], f"d/dlogp{label} (fp64)", grad, case["grad"])


def test_the_builtin_checks_exercise_the_clips():
    # the data must reach every branch: PPO clip on both sides and verl's dual clip (ratios above 3, A < 0)
    block = live()["builtin"][0]
    batch = block["batch"]
    ratio = (batch["logp"] - batch["old"]).exp()
    real = batch["mask"].bool()
    negative = (batch["adv"] < 0).unsqueeze(-1)
    assert int(((ratio > 3) & negative & real).sum()) >= 2
    assert int(((ratio < 0.8) & negative & real).sum()) >= 2
    assert int(((ratio > 1.2) & ~negative & real).sum()) >= 2
    vanilla = next(c for c in block["cases"] if c["mode"] == "vanilla" and c["kl"] is None)
    assert vanilla["metrics"]["actor/pg_clipfrac_lower"] > 0


def test_low_var_kl_clamps(record):
    # log-ratios beyond +-20 and k3 values beyond 10: verl clamps both, for "low_var_kl" and "k3" alike
    block = live()["extreme_kl"]
    batch = block["batch"]
    config = LossConfig.preset("verl.vanilla", beta=0.01, kl="low_var_kl")
    loss, grad = ours(batch, config, normalizer_of(block["info"]), ref=True)
    for verl_type, out in block["out"].items():
        check(record, "verl.vanilla", f"loss, KL {verl_type} clamps", loss, out["loss"])
        check(record, "verl.vanilla", f"d/dlogp, KL {verl_type} clamps", grad, out["grad"])
    unclamped, _ = ours(
        batch, LossConfig.preset("verl.vanilla", beta=0.01, kl="k3"), normalizer_of(block["info"]), True
    )
    assert abs(float(unclamped - loss)) > 1.0  # the clamps are active in this data


@pytest.mark.parametrize("mode", list(PRESET))
def test_per_call_fallback(mode, record):
    # verl's losses called with no global_batch_info fall back to the call's own counts (verl #7321):
    # the presets without a normaliser, L = the padded width of the call.
    block = live()["per_call"]["full"]
    batch = block["batch"]
    for case in (c for c in block["cases"] if c["mode"] == mode):
        length = batch["mask"].shape[1] if case["agg"] == "seq-mean-token-sum-norm" else None
        loss, grad = ours(batch, LossConfig.preset(PRESET[mode], aggregation=case["agg"], max_completion_length=length))
        check(record, PRESET[mode], "loss, per call (fp64)", loss, case["loss"])
        check(record, PRESET[mode], "d/dlogp, per call (fp64)", grad, case["grad"])


def test_per_call_fallback_leaves_empty_completions_out_of_the_count():
    # A known quirk, measured: in the fallback verl's seq-mean modes divide by the completions that have a
    # token (8 of 10 here), while its trainer's global_batch_size counts every completion, as we do. The
    # whole difference is that factor: ours * 10 / 8 is verl's, to rounding.
    block = live()["per_call"]["empty_rows"]
    batch = block["batch"]
    rows = batch["mask"].shape[0]
    nonempty = int((batch["mask"].sum(-1) > 0).sum())
    assert (rows, nonempty) == (10, 8)
    for case in block["cases"]:
        agg = case["agg"]
        length = batch["mask"].shape[1] if agg == "seq-mean-token-sum-norm" else None
        loss, grad = ours(batch, LossConfig.preset(PRESET[case["mode"]], aggregation=agg, max_completion_length=length))
        seq_mean = agg.startswith("seq-mean") or case["mode"] == "sapo"  # sapo is always seq-mean-token-mean
        factor = rows / nonempty if seq_mean else 1.0
        torch.testing.assert_close(loss * factor, case["loss"], rtol=1e-13, atol=1e-16)
        torch.testing.assert_close(grad * factor, case["grad"], rtol=1e-13, atol=1e-16)


def test_verl_seq_mean_token_sum_norm_is_a_mean_over_completions(record):
    # verl 0.9.1 settles verl.dr_grpo: sum_{i,t} l m / (N_seq L), not the sum / L of verl <= 0.7
    block = live()["builtin"][0]
    batch, info = block["batch"], block["info"]
    case = next(
        c
        for c in block["cases"]
        if (c["mode"], c["agg"], c["kl"], c["scale"]) == ("vanilla", "seq-mean-token-sum-norm", None, 20)
    )
    as_sum = LossConfig.preset("verl.vanilla", aggregation="token-sum-norm", max_completion_length=20)
    as_mean = LossConfig.preset("verl.dr_grpo", max_completion_length=20)
    norm = normalizer_of(info, 20)
    loss, grad = ours(batch, as_mean, norm)
    check(record, "verl.dr_grpo", "loss (fp64)", loss, case["loss"])
    check(record, "verl.dr_grpo", "d/dlogp (fp64)", grad, case["grad"])
    ratio = float(ours(batch, as_sum, norm)[0] / case["loss"])
    assert ratio == pytest.approx(info["global_batch_size"], rel=1e-12)  # the old preset: N_seq times too large


def test_verl_dr_grpo_needs_a_constant_length_and_is_split_invariant():
    with pytest.raises(ValueError, match="max_completion_length"):
        LossConfig.preset("verl.dr_grpo")
    config = LossConfig.preset("verl.dr_grpo", max_completion_length=16)
    assert not config.per_call_normalization
    StepNormalizer.from_masks([torch.ones(2, 3), torch.ones(1, 5)], config)  # accepted: step-wide by definition


@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
def test_verl_grpo_advantages(dtype, record):
    results = live()["advantages"]
    rtol, atol = (1e-15, 1e-15) if dtype == "torch.float64" else (1e-6, 1e-6)
    for std, preset in ((True, "verl.grpo"), (False, "verl.dr_grpo")):
        case = results[(dtype, std)]
        config = LossConfig.preset(preset, max_completion_length=1)
        got = group_advantages(case["rewards"], 8, config)
        spread = slice(0, 32)  # the four groups with distinct rewards; the last two have equal rewards
        record(preset, PEER, f"advantages ({dtype.split('.')[1]})", got[spread], case["adv"][spread])
        torch.testing.assert_close(got[spread], case["adv"][spread], rtol=rtol, atol=atol)
        assert torch.equal(got[32:], torch.zeros(16, dtype=got.dtype))  # equal rewards: exactly 0 here
        if dtype == "torch.float64" or not std:
            torch.testing.assert_close(case["adv"][32:], got[32:], rtol=0, atol=atol)
        else:
            # A known verl quirk, measured: in float32 the mean of eight 0.1s is not 0.1, and verl divides the
            # leftover (~1e-8) by std + 1e-6 with std ~1e-8 as well, so an equal-reward group gets |A| of a
            # few 1e-2 where it should be 0 (drgrpo's group mean is exact for equal rewards).
            leftover = float(case["adv"][32:].abs().max())
            record(preset, PEER, "advantages, equal rewards (float32)", got[32:], case["adv"][32:])
            assert 1e-3 < leftover < 0.2, leftover
    single = results[(dtype, "singleton")]
    got = group_advantages(single["rewards"], 1, LossConfig.preset("verl.dr_grpo", max_completion_length=1))
    torch.testing.assert_close(got, single["adv"], rtol=0, atol=0)  # a group of one keeps its reward in verl


def test_norm_adv_by_std_false_is_the_papers_advantage():
    # verl's norm_adv_by_std_in_grpo=False computes r - mean_group(r), Dr. GRPO's advantage: in float64 the
    # same numbers as drgrpo's dr_grpo preset; groups of one differ (verl keeps the reward, we give 0).
    results = live()["advantages"]
    case = results[("torch.float64", False)]
    paper = group_advantages(case["rewards"], 8, LossConfig.preset("dr_grpo", max_completion_length=1))
    torch.testing.assert_close(paper, case["adv"], rtol=0, atol=1e-15)
    assert torch.equal(paper[-16:], torch.zeros(16, dtype=paper.dtype))  # the two equal-reward groups: exactly 0
    single = results[("torch.float64", "singleton")]
    assert group_advantages(single["rewards"], 1, LossConfig.preset("dr_grpo", max_completion_length=1)).eq(0).all()
    assert single["adv"].ne(0).all()


# --------------------------------------------------------------------------- outcome advantage estimators

ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline", "opo", "grpo_passk", "gpg")
# verl's own rounding, measured and explained (relative to the largest |A|; 0 where not listed):
# rpp: verl's masked_mean divides by (tokens + 1e-8); gpg: verl's alpha = N / count_nonzero is float32;
# grpo with std on groups of one: verl divides by float32 (1.0 + 1e-6)
ESTIMATOR_RTOL = {"reinforce_plus_plus_baseline": 1e-9, "gpg": 1e-7}


@pytest.mark.parametrize("layout", ["groups", "singletons"])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_outcome_estimators_through_verls_call(name, layout, record):
    # verl's `name` and drgrpo.<name> (registered by the entry point) called as verl's trainer calls them, on the
    # same token-level rewards: interleaved uids, ragged lengths, zero rewards, a tie, an equal-reward prompt
    block = live()["estimators"]
    assert block["registered"] == sorted(f"drgrpo.{n}" for n in ESTIMATORS)
    data = block[layout]
    mask = data["mask"]
    for case in (c for c in data["cases"] if c["name"] == name):
        verl, ours = case["verl"], case["ours"]
        if "error" in verl:  # grpo_passk on groups of one: both refuse
            assert layout == "singletons" and name == "grpo_passk"
            assert "group_size must be >= 2" in ours["error"]
            continue
        rtol = ESTIMATOR_RTOL.get(name, 1e-7 if (name, layout, case["norm"]) == ("grpo", "singletons", True) else 0)
        scale = float(verl["adv"].abs().max())
        label = f"drgrpo.{name}" + (" (no std)" if name in ("grpo", "grpo_passk") and not case["norm"] else "")
        record(label, PEER, f"advantages, {layout}", ours["adv"], verl["adv"])
        torch.testing.assert_close(ours["adv"], verl["adv"], rtol=0, atol=rtol * scale + 1e-15)
        torch.testing.assert_close(ours["returns"], ours["adv"], rtol=0, atol=0)
        assert torch.equal(ours["adv"] * (1 - mask), torch.zeros_like(mask))  # 0 on padding, as verl's
        assert scale > 0.1


def test_verl_estimators_refuse_prompts_with_different_group_sizes():
    message = live()["estimators"]["uneven_groups"]
    assert message == (
        "ValueError: adv_estimator drgrpo.rloo needs every prompt to have the same number of completions; "
        "got group sizes [2, 3]"
    )


def test_outcome_estimators_match_the_float64_oracle():
    # drgrpo.outcome_advantages against reference.oracle_outcome_advantages (plain loops), contiguous groups of 1, 2, 5
    from drgrpo import reference
    from drgrpo.advantages import OUTCOME_ESTIMATORS, outcome_advantages

    g = torch.Generator().manual_seed(3)
    for group_size in (1, 2, 5):
        rewards = torch.rand(20, generator=g, dtype=torch.float64)
        rewards[::3] = 0.0
        lengths = torch.randint(1, 9, (20,), generator=g)
        for std in ("group", "none"):
            config = LossConfig(advantage_std=std, std_eps=1e-6)
            for name in OUTCOME_ESTIMATORS[1:]:
                if name == "grpo_passk" and group_size == 1:
                    with pytest.raises(ValueError, match="group_size must be >= 2"):
                        outcome_advantages(rewards, 1, config, name)
                    continue
                got = outcome_advantages(rewards, group_size, config, name, lengths=lengths)
                want = reference.oracle_outcome_advantages(
                    rewards.numpy(), group_size, name, lengths=lengths.numpy(), std=std, eps=1e-6
                )
                torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="pass lengths"):
        outcome_advantages(torch.zeros(4), 2, LossConfig(), "opo")
    with pytest.raises(ValueError, match="estimator must be one of"):
        outcome_advantages(torch.zeros(4), 2, LossConfig(), "remax")


# --------------------------------------------------------------------------- verl's other loss modes: the oracle


def _ragged(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (9,), generator=g)
    mask = (torch.arange(7) < lengths.unsqueeze(1)).double()
    logp = -torch.rand(9, 7, generator=g, dtype=torch.float64) * 2.5 - 0.02
    old = (logp + 0.7 * torch.randn(9, 7, generator=g, dtype=torch.float64)).clamp(max=-0.01)  # probabilities < 1
    adv = torch.randn(9, generator=g, dtype=torch.float64)
    return {"logp": logp, "old": old, "mask": mask, "adv": adv}


@pytest.mark.parametrize("preset", ["verl.gpg", "verl.dro", "verl.dppo_tv", "verl.dppo_kl"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_new_members_match_the_float64_oracle(preset, agg):
    # loss against reference.oracle_policy_loss (plain loops); d loss / d logp against the hand-derived gradient:
    # gpg -A, dro -(A - beta (logp - old)), dppo -A min(r, c) on the tokens inside the trust region (the loss
    # is linear in logp there, so the oracle's per-token loss / logp is its gradient)
    from drgrpo import reference

    batch = _ragged(5)
    config = LossConfig.preset(preset, aggregation=agg, dro_beta=0.3, dppo_cap=1.5, clip_high=0.1)
    logp = batch["logp"].clone().requires_grad_()
    out = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], config)
    out.loss.backward()
    args = (batch["logp"].numpy(), batch["old"].numpy(), batch["adv"].numpy(), batch["mask"].numpy(), config)
    assert float(out.loss.detach()) == pytest.approx(reference.oracle_policy_loss(*args), rel=1e-13, abs=1e-15)
    per_token = reference.per_token_losses(*args)
    m = batch["mask"].numpy()
    counts = m.sum(1, keepdims=True)
    weight = {
        "token-mean": m / m.sum(),
        "seq-mean-token-mean": m / (counts * m.shape[0]),
        "seq-mean-token-sum": m / m.shape[0],
    }[agg]
    lp, old, adv = batch["logp"].numpy(), batch["old"].numpy(), batch["adv"].numpy()[:, None]
    if preset == "verl.gpg":
        token_grad = -adv + 0 * lp
    elif preset == "verl.dro":
        token_grad = -(adv - 0.3 * (lp - old))
    else:
        token_grad = per_token / lp  # -A min(r, c) inside, 0 outside
    torch.testing.assert_close(logp.grad, torch.from_numpy(token_grad * weight), rtol=1e-12, atol=1e-16)
    if preset.startswith("verl.dppo"):
        inside = (per_token != 0) & (m != 0)
        assert 0 < inside.sum() < m.sum()  # some tokens leave the trust region
        ratio = np.exp(lp - old)
        assert (inside & (ratio > 1.5)).any()  # and the cap binds on some


def test_dro_needs_dro_beta():
    batch = _ragged(6)
    config = LossConfig.preset("verl.dro")
    with pytest.raises(ValueError, match="surrogate 'dro' needs dro_beta"):
        policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], config)
    with pytest.raises(ValueError, match="dro_beta must be positive, got -1"):
        LossConfig.preset("verl.dro", dro_beta=-1.0)


@pytest.mark.parametrize("preset", ["verl.geo_mean", "gmpo"])
def test_geo_mean_matches_the_oracle_and_finite_differences(preset):
    from drgrpo import reference

    batch = _ragged(7)
    config = LossConfig.preset(preset)
    args = (batch["old"], batch["adv"], batch["mask"], config)
    loss = policy_loss(batch["logp"], *args).loss
    numpy_args = (batch["old"].numpy(), batch["adv"].numpy(), batch["mask"].numpy(), config)
    assert float(loss) == pytest.approx(reference.oracle_policy_loss(batch["logp"].numpy(), *numpy_args), rel=1e-13)
    d = (batch["logp"] - batch["old"]).abs() * batch["mask"]
    low, high = config.epsilon_low, config.clip_high
    assert bool(((d > high) | (d > low)).any()) and bool((d < min(low, high)).any())  # clipped and kept tokens
    logp = batch["logp"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: policy_loss(lp, *args).loss, (logp,), eps=1e-7, atol=1e-8)


@pytest.mark.parametrize("preset", ["verl.kl_cov", "verl.clip_cov"])
def test_covariance_members_match_the_oracle(preset):
    # the covariance is over every real token of the call; clip_cov's random draw is the global torch generator,
    # seeded alike for the function and the oracle
    from drgrpo import reference

    batch = _ragged(8)
    config = LossConfig.preset(preset, kl_cov_ratio=0.1, ppo_kl_coef=0.5, clip_cov_ratio=0.2, clip_cov_lb=0.05)
    args = (batch["old"], batch["adv"], batch["mask"], config)
    numpy_args = (batch["logp"].numpy(), batch["old"].numpy(), batch["adv"].numpy(), batch["mask"].numpy(), config)
    torch.manual_seed(3)
    loss = policy_loss(batch["logp"], *args).loss
    torch.manual_seed(3)
    per_token = reference.per_token_losses(*numpy_args)
    torch.manual_seed(3)
    assert float(loss) == pytest.approx(reference.oracle_policy_loss(*numpy_args), rel=1e-13)
    m = batch["mask"].numpy()
    lp, old, adv = batch["logp"].numpy(), batch["old"].numpy(), batch["adv"].numpy()[:, None]
    plain = -adv * np.exp(lp - old)
    if preset == "verl.kl_cov":
        penalised = (np.abs(per_token - plain) > 1e-12) & (m != 0)
        assert penalised.sum() == int(m.sum() * 0.1)  # exactly the top share of tokens
    else:
        clipped = np.maximum(plain, -adv * np.clip(np.exp(lp - old), 0.8, 1.2))
        cut = (per_token == 0) & (clipped != 0) & (m != 0)
        assert cut.sum() == int(m.sum() * 0.2)
        torch.manual_seed(4)  # another draw cuts other tokens
        assert float(policy_loss(batch["logp"], *args).loss) != pytest.approx(float(loss), rel=1e-9)
