"""``loss_mode=drgrpo.<preset>`` inside verl 0.9.1, run live in ``.venv-verl`` (see ``tests/verl_env.py``).

The runner imports verl (never drgrpo), looks the losses up in verl's registry and calls them through
verl's actor loss entry point ``ppo_loss``, which fills ``config.global_batch_info`` from the micro-batch.
The oracle here is the whole mini-batch's loss from :func:`drgrpo.policy_loss` in this environment, with
the LossConfig that the settings table of ``drgrpo.integrations.verl`` prescribes, written out again below.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from drgrpo.config import LossConfig, preset_config, preset_names
from drgrpo.loss import policy_loss
from verl_env import MEASURED, ROOT, live

VERL_DEFAULTS = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0}
VERL_KL = {"k1": "k1", "kl": "k1", "k3": "low_var_kl", "low_var_kl": "low_var_kl"}  # verl's k3 is clamped


def expected_config(preset: str, settings: dict) -> LossConfig:
    """The settings table: verl's clip ratios, dual clip (token-level PPO), taus and L; the rest from the preset.

    The policy loss has beta 0; verl's own KL term (use_kl_loss) is added to the oracle as beta * kl.
    """
    s = {**VERL_DEFAULTS, **settings}
    low = s["clip_ratio"] if s["clip_ratio_low"] is None else s["clip_ratio_low"]
    high = s["clip_ratio"] if s["clip_ratio_high"] is None else s["clip_ratio_high"]
    base = preset_config(preset)
    overrides = {"clip_low": low, "clip_high": high, "beta": 0.0}
    if s.get("use_kl_loss"):
        overrides.update(beta=s["kl_loss_coef"], kl=VERL_KL[s["kl_loss_type"]])
    overrides.update(sapo_tau_pos=s.get("tau_pos", 1.0), sapo_tau_neg=s.get("tau_neg", 1.05))
    if base.surrogate == "ppo" and base.ratio_level == "token":
        overrides["dual_clip"] = s["clip_ratio_c"]
    if s.get("loss_scale_factor") is not None:
        overrides["max_completion_length"] = s["loss_scale_factor"]
    if preset.startswith("verl.") and "loss_agg_mode" in s:  # the twins of verl's modes aggregate with it
        overrides["aggregation"] = s["loss_agg_mode"]
    if base.surrogate in ("dppo_tv", "dppo_kl"):
        overrides["dppo_cap"] = s["clip_ratio_c"]  # the cap of the truncated ratio
    if base.surrogate == "dro":
        overrides["dro_beta"] = s["policy_loss"]["dro_beta"]
    return LossConfig.preset(preset, **overrides)


def whole_batch(batch: dict, config: LossConfig):
    logp = batch["logp"].clone().requires_grad_()
    ref = batch["ref"] if config.beta > 0 else None
    out = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], config, ref_logp=ref)
    out.loss.backward()
    return out.loss.detach(), logp.grad


# --------------------------------------------------------------------------- the entry point


@pytest.mark.slow
def test_import_verl_alone_registers_every_step_wide_preset():
    ep = live()["entry_point"]
    assert ep["verl_version"] == "0.9.1"
    assert ep["modules_before_verl"] == []  # the runner never imports drgrpo itself
    assert "drgrpo.integrations.verl" in ep["modules_after_verl"]  # verl's plugin loader did
    assert (ep["function_module"], ep["function_preset"]) == ("drgrpo.integrations.verl", "dr_grpo")
    # every preset defined over the whole mini-batch, and verl.geo_mean (per call in verl itself)
    step_wide = {n for n in preset_names() if not preset_config(n).per_call_normalization} | {"verl.geo_mean"}
    step_wide |= {"verl.bypass_mode"}  # a dispatch over verl.vanilla and verl.gpg, not a preset
    assert {"dr_grpo", "grpo", "dapo", "bnpo", "gspo", "cispo", "sapo"} <= step_wide
    assert set(ep["registered"]) == {f"drgrpo.{n}" for n in step_wide}
    for name, message in ep["per_call_lookup"].items():  # trl.grpo, trl.bnpo, trl.dr_grpo: per micro-batch
        assert message is not None and message.startswith(f"Unsupported loss mode: {name}")
    # the environment runs this checkout's drgrpo (an editable install), not a stale copy
    assert Path(ep["drgrpo_file"]).resolve() == (ROOT / "src" / "drgrpo" / "__init__.py").resolve()


def test_import_without_verl_says_how_to_install():
    if importlib.util.find_spec("verl") is not None:
        pytest.skip("verl is installed in this environment; the runner checks the plug-in there")
    with pytest.raises(ImportError, match=r"from a clone of drgrpo, pip install -e '\.\[verl\]'"):
        importlib.import_module("drgrpo.integrations.verl")


# --------------------------------------------------------------------------- split invariance


@pytest.mark.parametrize(
    "case",
    [
        "dr_grpo",
        "grpo",
        "dapo",
        "bnpo",
        "gspo",
        "cispo",
        "sapo",
        "sapo_taus",
        "grpo_no_dual_clip",
        "dr_grpo_clip_ratio",
        "oat_drgrpo_default_L",
        "grpo_with_verl_kl",
        "verl_gpg",
        "verl_dro",
        "verl_dppo_tv",
        "verl_dppo_kl",
        "gmpo",
    ],
)
def test_micro_batches_on_every_rank_give_the_mini_batch_gradient(case):
    split = live()["split"]
    batch = split["batch"]
    preset, settings = split["cases"][case]
    loss, grad = whole_batch(batch, expected_config(preset, settings))
    runs = [r for r in split["runs"] if r["case"] == case]
    assert {(r["ranks"], r["micro"]) for r in runs} == {(1, 1), (1, 3), (2, 1), (2, 3)}
    assert any(len(set(r["widths"])) > 1 for r in runs)  # micro-batches of different padded widths
    for run in runs:
        # FSDP averages the ranks' gradients (the runner does the same); each rank sums its micro-batches
        torch.testing.assert_close(run["grad"], grad, rtol=0, atol=1e-10)
        assert abs(sum(run["losses"]) / run["ranks"] - float(loss)) <= 1e-12 * max(1.0, abs(float(loss)))
    assert float(grad.abs().max()) > 1e-5  # 1e-10 is a tight tolerance for these gradients


def test_completions_without_tokens_count_as_completions():
    # verl's global_batch_size counts every completion of the mini-batch, as drgrpo's N_seq does
    block = live()["split"]["empty_rows"]
    batch = block["batch"]
    assert int((batch["mask"].sum(-1) == 0).sum()) == 3
    for run in block["runs"]:
        _, grad = whole_batch(batch, expected_config(*live()["split"]["cases"][run["case"]]))
        torch.testing.assert_close(run["grad"], grad, rtol=0, atol=1e-10)


def test_the_split_cases_differ_from_each_other():
    # the mapping is visible in the numbers: taus, the dual clip and the clip ratios each change the gradient
    split = live()["split"]
    batch = split["batch"]

    def grad_of(case):
        return whole_batch(batch, expected_config(*split["cases"][case]))[1]

    pairs = ("sapo", "sapo_taus"), ("grpo", "grpo_no_dual_clip"), ("dr_grpo", "dr_grpo_clip_ratio")
    for a, b in (*pairs, ("grpo", "grpo_with_verl_kl")):
        assert float((grad_of(a) - grad_of(b)).abs().max()) > 1e-4, (a, b)


# --------------------------------------------------------------------------- against verl's own losses


def test_same_numbers_as_verl_vanilla_with_rollout_correction():
    # drgrpo.bnpo (PPO clip, verl's dual clip, token-mean over the mini-batch) is verl's vanilla loss with
    # its default token-mean: the same loss, gradient and metrics, with and without rollout IS weights.
    block = live()["rollout_correction"]
    for suffix in ("", "_plain"):
        ours, theirs = block[f"drgrpo.bnpo{suffix}"], block[f"vanilla{suffix}"]
        torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=1e-14, atol=0)
        torch.testing.assert_close(ours["grad"], theirs["grad"], rtol=1e-14, atol=1e-17)
        for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pg_loss"):
            assert ours["metrics"][name] == pytest.approx(theirs["metrics"][name], rel=1e-6, abs=1e-12), name
    assert block["vanilla"]["metrics"]["actor/pg_clipfrac"] > 0
    assert float((block["vanilla"]["grad"] - block["vanilla_plain"]["grad"]).abs().max()) > 1e-3  # weights matter


def test_gspo_against_verl_gspo_with_rollout_correction():
    # Same aggregation, same loss. Without IS weights the same gradient too. With per-token weights rho the
    # gradients differ in form: verl's gspo is GSPO-token (token t of completion i gets w rho_t (-A s_i)),
    # drgrpo's sequence ratio spreads the row's weighted sum evenly over its tokens (mean_t' w rho_t' (-A s_i)
    # on each); each completion's summed gradient is the same.
    block = live()["rollout_correction"]
    mask = block["batch"]["mask"]
    plain_ours, plain_verl = block["drgrpo.gspo_plain"], block["gspo_plain"]
    torch.testing.assert_close(plain_ours["loss"], plain_verl["loss"], rtol=1e-14, atol=0)
    torch.testing.assert_close(plain_ours["grad"], plain_verl["grad"], rtol=1e-13, atol=1e-17)
    ours, theirs = block["drgrpo.gspo"], block["gspo"]
    torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=1e-14, atol=0)
    torch.testing.assert_close(ours["grad"].sum(-1), theirs["grad"].sum(-1), rtol=1e-13, atol=1e-17)
    per_token = (ours["grad"] - theirs["grad"]).abs() * mask
    assert float(per_token.max()) > 1e-3 * float(theirs["grad"].abs().max())  # the forms do differ per token


def padding_runs() -> tuple[dict, list[dict], torch.Tensor]:
    block = live()["padding"]
    config = LossConfig.preset("dr_grpo", max_completion_length=16, dual_clip=3.0)  # verl's vanilla has c = 3
    _, grad = whole_batch(block["batch"], config)
    return block, block["runs"], grad


def relative_error(run: dict, grad: torch.Tensor) -> float:
    return float((run["grad"] - grad).norm() / grad.norm())


def test_drgrpo_dr_grpo_is_the_whole_batch_objective_whatever_the_padding():
    _, runs, grad = padding_runs()
    for run in runs:
        if run["mode"] == "drgrpo.dr_grpo" or run["scale"] is not None:
            # with loss_scale_factor set, verl 0.9.1's own seq-mean-token-sum-norm is the same objective
            torch.testing.assert_close(run["grad"], grad, rtol=0, atol=1e-10)


def test_verl_builtin_dr_grpo_without_loss_scale_factor_follows_the_padding():
    # verl's default L is each micro-batch's padded width: exact when every micro-batch is padded to the
    # budget (the legacy trainer pads responses to rollout.response_length), off when micro-batches are
    # padded to their own longest completion (nested tensors: the v1 trainer)
    _, runs, grad = padding_runs()
    default = [r for r in runs if r["mode"] == "vanilla" and r["scale"] is None]
    assert len(default) == 4
    for run in default:
        error = relative_error(run, grad)
        layout = "own longest completion" if run["trimmed"] else "the budget 16"
        MEASURED.append(
            f"verl vanilla, seq-mean-token-sum-norm, no loss_scale_factor, {run['ranks']} rank(s), micro-batches "
            f"padded to {layout} (widths {run['widths']}): |g - g_whole| / |g_whole| = {error:.3f}"
        )
        if run["trimmed"]:
            assert len(set(run["widths"])) > 1 and error > 0.05, (run["widths"], error)
        else:
            assert set(run["widths"]) == {16} and error < 1e-12
        # the whole mechanism: micro-batch k's gradient is the objective's times budget / its padded width T_k
        for (lo, hi), width in zip(run["rows"], run["widths"]):
            torch.testing.assert_close(run["grad"][lo:hi], grad[lo:hi] * 16 / width, rtol=1e-12, atol=1e-16)


# --------------------------------------------------------------------------- errors verl users see


def test_missing_global_batch_info_is_an_error_naming_the_field():
    messages = live()["errors"]
    assert "dp_size, batch_num_tokens, global_batch_size" in messages["empty_info"]
    for field in ("dp_size", "batch_num_tokens", "global_batch_size"):
        assert f"global_batch_info has no {field} " in messages[f"missing_{field}"]
    assert "has no global_batch_size" in messages["none_global_batch_size"]
    assert all(messages[k].startswith("ValueError") for k in messages if k.startswith(("missing", "empty", "none")))


def test_dr_grpo_without_a_constant_length_is_an_error():
    messages = live()["errors"]
    assert "loss_scale_factor is not set" in messages["dr_grpo_without_L"]
    assert "padded width" in messages["dr_grpo_without_L"]
    assert messages["dr_grpo_with_L"] is None


def test_twins_of_verl_modes_follow_loss_agg_mode():
    # drgrpo.verl.<mode> against verl's <mode>, both through ppo_loss on the same batch, for every loss_agg_mode:
    # the same loss and gradient (verl's sapo forces seq-mean-token-mean and so does its twin); without
    # loss_scale_factor, seq-mean-token-sum-norm is refused (verl divides by each micro-batch's padded width)
    cases = live()["twins"]["cases"]
    assert {c["mode"] for c in cases} == {"vanilla", "gspo", "cispo", "sapo"} and len(cases) == 24
    for case in cases:
        verl, ours = case["verl"], case["ours"]
        needs_l = case["agg"] == "seq-mean-token-sum-norm" and case["scale"] is None and case["mode"] != "sapo"
        if needs_l:
            assert "loss_scale_factor is not set" in ours["error"], case
            continue
        torch.testing.assert_close(ours["loss"], verl["loss"], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(ours["grad"], verl["grad"], rtol=1e-13, atol=1e-17)
    # the aggregations really differ: token-sum vs token-mean of vanilla
    by = {(c["mode"], c["agg"], c["scale"]): c["verl"] for c in cases}
    ratio = float(by[("vanilla", "token-sum", None)]["loss"] / by[("vanilla", "token-mean", None)]["loss"])
    assert abs(ratio - 1) > 1.0, ratio


NEW_TWINS = ("gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "kl_cov", "clip_cov")


@pytest.mark.parametrize("mode", NEW_TWINS)
def test_twins_of_verls_other_modes(mode):
    # drgrpo.verl.<mode> against verl's <mode> through ppo_loss, every loss_agg_mode, with rollout IS weights (and
    # without, for token-mean); policy_loss.dro_beta 0.3, verl's clip_ratio_c 3 as DPPO's cap
    block = live()["new_modes"]
    cases = [c for c in block["cases"] if c["mode"] == mode]
    assert len(cases) == 7  # 5 modes, sum-norm with and without L, token-mean without IS weights too
    for case in cases:
        verl, ours = case["verl"], case["ours"]
        if case["agg"] == "seq-mean-token-sum-norm" and case["scale"] is None and mode != "geo_mean":
            assert "loss_scale_factor is not set" in ours["error"]  # verl would divide by the padded width
            continue
        # geo_mean ignores loss_agg_mode (the mean over the call's completions, as verl's); with IS weights verl
        # takes log(w + 1e-10), a relative 1e-10 of the weights that drgrpo does not add
        rtol = 1e-9 if mode == "geo_mean" and case["weights"] else 1e-13
        torch.testing.assert_close(ours["loss"], verl["loss"], rtol=rtol, atol=1e-15)
        torch.testing.assert_close(ours["grad"], verl["grad"], rtol=rtol, atol=1e-17)
        assert float(verl["grad"].abs().max()) > 1e-2
    if mode == "clip_cov":  # the random cut is active (both drew the same tokens: the same seed)
        token_mean = next(c for c in cases if c["agg"] == "token-mean" and c["weights"])
        assert token_mean["verl"]["metrics"]["actor/pg_clipfrac"] > 0.05
    if mode.startswith("dppo"):  # the trust region drops tokens, and the cap 3 truncates ratios e^1.5
        token_mean = next(c for c in cases if c["agg"] == "token-mean" and c["weights"])
        assert token_mean["verl"]["metrics"]["actor/pg_clipfrac"] > 0.02  # 2 or more of 46 tokens
        assert token_mean["verl"]["metrics"]["actor/pg_clipfrac_lower"] > 0


def test_geo_mean_is_per_call_in_verl_and_in_its_twin():
    # verl's geo_mean is torch.mean over the micro-batch's completions, whatever global_batch_info says: its twin
    # keeps that, so one micro-batch on one rank is the whole mini-batch's mean and a split is not
    split = live()["split"]
    batch = split["batch"]
    _, whole = whole_batch(batch, LossConfig.preset("verl.geo_mean"))
    runs = {(r["mode"], r["ranks"], r["micro"]): r for r in split["geo_mean"]}
    for ranks, micro in ((1, 1), (2, 3)):
        ours, verl = runs[("drgrpo.verl.geo_mean", ranks, micro)], runs[("geo_mean", ranks, micro)]
        torch.testing.assert_close(ours["grad"], verl["grad"], rtol=1e-13, atol=1e-17)
    torch.testing.assert_close(runs[("geo_mean", 1, 1)]["grad"], whole, rtol=1e-13, atol=1e-17)
    split_run = runs[("geo_mean", 2, 3)]
    error = relative_error(split_run, whole)
    MEASURED.append(
        f"verl geo_mean and drgrpo.verl.geo_mean, 2 ranks x 3 micro-batches (rows {split_run['rows']}): "
        f"|g - g_whole| / |g_whole| = {error:.2f}"
    )
    assert error > 0.5  # each micro-batch's mean, summed: about 3 times the mini-batch's mean


def test_bypass_mode_twin():
    # verl's bypass_mode and drgrpo.verl.bypass_mode through ppo_loss (rollout_correction from the same config):
    # ppo_clip is vanilla without IS weights; reinforce is -A logp times min(rho, 1.5), rho per token or completion
    block = live()["bypass_mode"]
    assert len(block["cases"]) == 12
    for case in block["cases"]:
        torch.testing.assert_close(case["ours"]["loss"], case["verl"]["loss"], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(case["ours"]["grad"], case["verl"]["grad"], rtol=1e-13, atol=1e-17)
    by = {(c["loss_type"], c["level"], c["agg"]): c["ours"]["grad"] for c in block["cases"]}
    for level in ("token", "sequence"):  # the weights matter, and differently by level
        assert (
            float((by[("reinforce", level, "token-mean")] - by[("reinforce", None, "token-mean")]).abs().max()) > 1e-3
        )
    assert (
        float((by[("reinforce", "token", "token-mean")] - by[("reinforce", "sequence", "token-mean")]).abs().max())
        > 1e-4
    )
    # the float64 oracle for reinforce with token weights, token-mean over the mini-batch: -A min(e^(logp - old), 1.5)
    batch = block["batch"]
    case = next(
        c for c in block["cases"] if (c["loss_type"], c["level"], c["agg"]) == ("reinforce", "token", "token-mean")
    )
    rho = (batch["logp"] - batch["old"]).exp().clamp(max=1.5)
    tokens = int(batch["mask"].sum()) + 17  # the runner's batch_num_tokens; dp_size 2 undoes FSDP's average
    expected = -batch["adv"].unsqueeze(-1) * rho * batch["mask"] * 2 / tokens
    torch.testing.assert_close(case["ours"]["grad"], expected, rtol=1e-13, atol=1e-17)
    refused = block["refused"]
    assert "rollout_correction.rollout_rs='token_k1'" in refused["rs"]
    assert "rollout_is_batch_normalize=True" in refused["batch_normalize"]
    assert "IcePop thresholds ('0.5_2.0')" in refused["icepop"]


def test_dro_without_dro_beta_is_refused():
    messages = live()["errors"]
    assert messages["dro_without_beta"].startswith("ValueError: ")
    assert "dro_beta" in messages["dro_without_beta"]


def test_core_presets_refuse_a_contradicting_loss_agg_mode():
    messages = live()["errors"]
    for key, mode, own, given in (
        ("dr_grpo_token_mean", "drgrpo.dr_grpo", "seq-mean-token-sum-norm", "token-mean"),
        ("grpo_token_sum", "drgrpo.grpo", "seq-mean-token-mean", "token-sum"),
        ("verl_dr_grpo_token_mean", "drgrpo.verl.dr_grpo", "seq-mean-token-sum-norm", "token-mean"),
    ):
        message = messages[key]
        assert message.startswith(f"ValueError: loss_mode {mode} aggregates with '{own}'"), message
        assert f"loss_agg_mode is '{given}'" in message and f"set loss_agg_mode={own}" in message
        assert "\n" not in message
    assert "loss_mode drgrpo.verl.vanilla (seq-mean-token-sum-norm)" in messages["twin_sum_norm_without_L"]
    assert "loss_scale_factor is not set" in messages["twin_sum_norm_without_L"]


def test_other_misuse_is_reported():
    messages = live()["errors"]
    assert "one advantage per completion" in messages["token_level_advantages"]
    assert "clip_ratio_c" in messages["bad_clip_ratio_c"] and "dual_clip must be > 1" in messages["bad_clip_ratio_c"]
    assert "needs verl's actor config" in messages["config_none"]
    assert "defined per micro-batch" in messages["per_call_preset"]
    assert "not replacing it" in messages["name_taken"]
    assert messages["reregister_own"] is None
