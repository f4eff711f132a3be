"""verl's own numbers on random float64 batches, computed inside ``.venv-verl`` (verl 0.9.1 installed).

Run by ``tests/verl_env.py`` as ``.venv-verl/bin/python tests/verl_live/run_checks.py OUT.pt``. It imports
verl first and drgrpo only through verl's ``verl.plugins`` entry point, then saves a dict of inputs and of
verl's outputs (losses, gradients, messages) with ``torch.save``. The comparisons against drgrpo are made
by the main test suite in its own environment (``tests/peers/test_verl.py``,
``tests/integrations/test_verl_plugin.py``); nothing here asserts.

Gradients are taken with respect to the per-token log-probs ``logp (B, T)`` that verl's ``ppo_loss``
receives (packed into its no-padding layout with a differentiable ``index_put``).
"""

from __future__ import annotations

import itertools
import sys

MODULES_BEFORE_VERL = sorted(m for m in sys.modules if m == "drgrpo" or m.startswith("drgrpo."))

import verl  # noqa: E402  (first: its plugin loader must be what imports drgrpo)

MODULES_AFTER_VERL = sorted(m for m in sys.modules if m == "drgrpo" or m.startswith("drgrpo."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

F64 = torch.float64
PROMPT = 2  # prompt tokens per sequence in the packed layout (any value > 0)
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = (None, "kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
BUILTIN_MODES = ("vanilla", "gspo", "cispo", "sapo")


# --------------------------------------------------------------------------- inputs


def ragged(rows: int, width: int, seed: int, *, min_len: int = 1, ratio_scale: float = 0.8) -> dict:
    """Right-padded float64 batch: logp, old, ref, rollout IS weights (B, T), mask (B, T) 0/1, advantages (B,).

    Lengths are skewed short (most below width / 3), so micro-batches padded to their own longest
    completion have different widths; the first token of up to four completions with A < 0 gets ratio
    e^1.5 > 3, where verl's dual clip caps the loss.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, generator=g, dtype=F64)
    lengths = (min_len + (width - min_len + 1) * u * u).long().clamp(max=width)
    lengths[torch.randint(0, rows, (1,), generator=g)] = width  # the widest row fills the padded width
    mask = (torch.arange(width) < lengths.unsqueeze(1)).to(F64)
    logp = -torch.rand(rows, width, generator=g, dtype=F64) * 3 - 0.01
    old = logp + ratio_scale * torch.randn(rows, width, generator=g, dtype=F64)
    ref = logp + 0.5 * torch.randn(rows, width, generator=g, dtype=F64)
    adv = torch.randn(rows, generator=g, dtype=F64)
    negative = torch.nonzero(adv < 0).flatten()[:4]
    old[negative, 0] = logp[negative, 0] - 1.5  # ratio e^1.5 > 3 with A < 0: verl's dual clip is active
    is_weights = 0.5 + torch.rand(rows, width, generator=g, dtype=F64)
    return {"logp": logp, "old": old, "ref": ref, "mask": mask, "adv": adv, "is_weights": is_weights}


def actor_config(loss_mode: str, policy_loss: dict | None = None, **settings) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **(policy_loss or {})),
        **settings,
    )


def call_ppo_loss(cfg: ActorConfig, batch: dict, info: dict, *, kl: bool = False, is_weights: bool = False) -> dict:
    """verl's actor loss entry point (``verl.workers.utils.losses.ppo_loss``) on one micro-batch.

    ``info`` is what verl's engine puts in the micro-batch (``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``); ``ppo_loss`` copies it into ``config.global_batch_info`` and calls the
    registered policy loss. Returns the loss, d loss / d logp (B, T) and the policy-loss metrics.
    """
    logp = batch["logp"].clone().requires_grad_()
    mask = batch["mask"]
    rows, width = mask.shape
    lengths = mask.sum(-1).long()
    seq = PROMPT + lengths
    starts = torch.cumsum(seq, 0) - seq
    r, c = mask.bool().nonzero(as_tuple=True)
    # log_probs at packed position j predict token j + 1: response token t of row i sits at start_i + PROMPT - 1 + t
    packed = torch.zeros(int(seq.sum()), dtype=F64).index_put((starts[r] + PROMPT - 1 + c,), logp[r, c])
    fields = {
        "prompts": torch.ones(rows, PROMPT, dtype=torch.long),
        "responses": torch.ones(rows, width, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(rows, PROMPT, dtype=torch.long), mask.long()], 1),
        "response_mask": mask.long(),
        "old_log_probs": batch["old"],
        "advantages": batch["adv"].unsqueeze(-1) * mask,  # verl broadcasts an outcome advantage to the tokens
    }
    if kl:
        fields["ref_log_prob"] = batch["ref"]
    if is_weights:
        fields["rollout_is_weights"] = batch["is_weights"]
    data = TensorDict(fields, batch_size=rows)
    tu.assign_non_tensor(data, **info)
    loss, metrics = ppo_loss(cfg, {"log_probs": packed}, data)
    loss.backward()
    plain = {k: (v.values[0] if hasattr(v, "values") else v) for k, v in metrics.items()}
    return {"loss": loss.detach(), "grad": logp.grad, "metrics": plain}


def direct_call(loss_mode: str, batch: dict, agg: str, **settings) -> dict:
    """A registered verl loss called directly with an empty ``global_batch_info`` (verl's per-call fallback)."""
    logp = batch["logp"].clone().requires_grad_()
    fn = core_algos.get_policy_loss_fn(loss_mode)
    cfg = actor_config(loss_mode, loss_agg_mode=agg, **settings)
    loss, _ = fn(batch["old"], logp, batch["adv"].unsqueeze(-1) * batch["mask"], batch["mask"].bool(), agg, cfg)
    loss.backward()
    return {"loss": loss.detach(), "grad": logp.grad}


def split_rows(rows: int, parts: int, g: torch.Generator) -> list[tuple[int, int]]:
    """``parts`` contiguous, uneven, non-empty row ranges covering ``range(rows)``."""
    cuts = sorted(torch.randperm(rows - 1, generator=g)[: parts - 1].add(1).tolist())
    bounds = [0, *cuts, rows]
    return list(itertools.pairwise(bounds))


def rows_of(batch: dict, lo: int, hi: int, trimmed: bool = True) -> dict:
    """Rows lo..hi; ``trimmed``: padded only to their own longest completion (verl's nested layout, the v1
    trainer), else kept at the mini-batch's width (the legacy trainer pads every response to the budget)."""
    width = max(1, int(batch["mask"][lo:hi].sum(-1).max())) if trimmed else batch["mask"].shape[1]
    return {k: (v[lo:hi, :width] if v.dim() == 2 else v[lo:hi]) for k, v in batch.items()}


def split_run(
    cfg_factory, batch: dict, ranks: int, micro: int, seed: int, trimmed: bool = True, kl: bool = False
) -> dict:
    """The mini-batch over ``ranks`` simulated data-parallel ranks, ``micro`` uneven micro-batches each.

    Every micro-batch goes through ``ppo_loss`` with the mini-batch's global counts; each rank's
    gradients accumulate, and the mini-batch gradient is their average over ranks (FSDP's all-reduce).
    """
    g = torch.Generator().manual_seed(seed)
    rows, width = batch["mask"].shape
    info = {"dp_size": ranks, "batch_num_tokens": int(batch["mask"].sum()), "global_batch_size": rows}
    grad = torch.zeros(rows, width, dtype=F64)
    losses, widths, spans = [], [], []
    for r_lo, r_hi in split_rows(rows, ranks, g) if ranks > 1 else [(0, rows)]:
        for lo, hi in split_rows(r_hi - r_lo, micro, g):
            mb = rows_of(batch, r_lo + lo, r_lo + hi, trimmed)
            out = call_ppo_loss(cfg_factory(), mb, info, kl=kl)
            grad[r_lo + lo : r_lo + hi, : mb["mask"].shape[1]] += out["grad"] / ranks
            losses.append(float(out["loss"]))
            widths.append(mb["mask"].shape[1])
            spans.append((r_lo + lo, r_lo + hi))
    return {"grad": grad, "losses": losses, "widths": widths, "rows": spans}


# --------------------------------------------------------------------------- checks


def entry_point() -> dict:
    fn = core_algos.get_policy_loss_fn("drgrpo.dr_grpo")
    refused = {}
    for name in ("drgrpo.trl.grpo", "drgrpo.trl.bnpo", "drgrpo.trl.dr_grpo"):
        try:
            core_algos.get_policy_loss_fn(name)
            refused[name] = None
        except ValueError as err:
            refused[name] = str(err)[:60]
    return {
        "modules_before_verl": MODULES_BEFORE_VERL,
        "modules_after_verl": MODULES_AFTER_VERL,
        "function_module": fn.__module__,
        "function_preset": getattr(fn, "drgrpo_preset", None),
        "drgrpo_file": sys.modules["drgrpo"].__file__,
        "registered": sorted(k for k in core_algos.POLICY_LOSS_REGISTRY if k.startswith("drgrpo.")),
        "per_call_lookup": refused,
        "verl_version": verl.__version__,
    }


def builtin_parity() -> list[dict]:
    """verl's built-in loss modes through ppo_loss, every loss_agg_mode and KL type, global counts over 2 ranks."""
    cases = []
    batch = ragged(12, 9, seed=1)
    # this micro-batch is one of several on rank 0 of 2: the mini-batch's counts are larger than its own
    info = {"dp_size": 2, "batch_num_tokens": int(batch["mask"].sum()) + 37, "global_batch_size": 12 + 9}
    for mode in BUILTIN_MODES:
        for agg in AGG_MODES:
            for kl in KL_TYPES:
                for scale in (None, 20) if agg == "seq-mean-token-sum-norm" else (None,):
                    settings = {"loss_agg_mode": agg, "loss_scale_factor": scale}
                    if kl is not None:
                        settings.update(use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type=kl)
                    out = call_ppo_loss(actor_config(mode, **settings), batch, info, kl=kl is not None)
                    cases.append({"mode": mode, "agg": agg, "kl": kl, "scale": scale, **out})
    return [{"batch": batch, "info": info, "cases": cases}]


def extreme_kl() -> dict:
    """low_var_kl's clamps: log-ratios beyond 20 and KL values beyond 10."""
    batch = ragged(4, 3, seed=5, min_len=3)
    batch["ref"] = batch["logp"] + torch.tensor([[-30.0, 0.5, 25.0], [12.0, -12.0, 0.1], [0.0, 3.0, -3.0], [1, 2, 3]])
    batch["old"] = batch["logp"].clone()
    info = {"dp_size": 1, "batch_num_tokens": int(batch["mask"].sum()), "global_batch_size": 4}
    out = {}
    for kl in ("low_var_kl", "k3"):
        cfg = actor_config("vanilla", use_kl_loss=True, kl_loss_coef=0.01, kl_loss_type=kl)
        out[kl] = call_ppo_loss(cfg, batch, info, kl=True)
    return {"batch": batch, "info": info, "out": out}


def per_call_fallback() -> dict:
    """Built-in modes called directly with no global batch info (verl's silent per-call fallback)."""
    full = ragged(10, 7, seed=2)
    with_empty = ragged(10, 7, seed=3)
    with_empty["mask"][[2, 7]] = 0.0  # completions with no tokens
    out = {"full": {"batch": full, "cases": []}, "empty_rows": {"batch": with_empty, "cases": []}}
    for key, batch in (("full", full), ("empty_rows", with_empty)):
        for mode in BUILTIN_MODES:
            for agg in AGG_MODES:
                out[key]["cases"].append({"mode": mode, "agg": agg, **direct_call(mode, batch, agg)})
    return out


def rollout_correction() -> dict:
    """verl vanilla vs drgrpo.bnpo, verl gspo vs drgrpo.gspo, through ppo_loss with and without rollout IS weights."""
    batch = ragged(8, 6, seed=4)
    info = {"dp_size": 2, "batch_num_tokens": int(batch["mask"].sum()) + 11, "global_batch_size": 8 + 5}
    gspo = actor_config("gspo", loss_agg_mode="seq-mean-token-mean")
    ours_gspo = actor_config("drgrpo.gspo", loss_agg_mode="seq-mean-token-mean")
    return {
        "batch": batch,
        "info": info,
        "vanilla": call_ppo_loss(actor_config("vanilla"), batch, info, is_weights=True),
        "drgrpo.bnpo": call_ppo_loss(actor_config("drgrpo.bnpo"), batch, info, is_weights=True),
        "vanilla_plain": call_ppo_loss(actor_config("vanilla"), batch, info),
        "drgrpo.bnpo_plain": call_ppo_loss(actor_config("drgrpo.bnpo"), batch, info),
        # GSPO: verl's gspo and drgrpo.gspo with the same aggregation, with and without IS weights
        "gspo": call_ppo_loss(gspo, batch, info, is_weights=True),
        "drgrpo.gspo": call_ppo_loss(ours_gspo, batch, info, is_weights=True),
        "gspo_plain": call_ppo_loss(gspo, batch, info),
        "drgrpo.gspo_plain": call_ppo_loss(ours_gspo, batch, info),
    }


def twins_follow_loss_agg_mode() -> dict:
    """verl's own loss modes and their drgrpo.verl.<mode> twins through ppo_loss, every loss_agg_mode (and L)."""
    batch = ragged(12, 9, seed=13)
    info = {"dp_size": 2, "batch_num_tokens": int(batch["mask"].sum()) + 29, "global_batch_size": 12 + 7}
    cases = []
    for mode in BUILTIN_MODES:
        for agg in AGG_MODES:
            for scale in (None, 20) if agg == "seq-mean-token-sum-norm" else (None,):
                out = {}
                for name in (mode, f"drgrpo.verl.{mode}"):
                    cfg = actor_config(name, loss_agg_mode=agg, loss_scale_factor=scale)
                    try:
                        out[name] = call_ppo_loss(cfg, batch, info)
                    except ValueError as err:
                        out[name] = {"error": f"ValueError: {err}"}
                ours = out[f"drgrpo.verl.{mode}"]
                cases.append({"mode": mode, "agg": agg, "scale": scale, "verl": out[mode], "ours": ours})
    return {"batch": batch, "info": info, "cases": cases}


NEW_MODES = ("gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "kl_cov", "clip_cov")
NEW_MODE_SETTINGS = {  # policy_loss.* settings of each mode (loud enough to matter on 12 x 9 tokens)
    "dro": {"dro_beta": 0.3},
    "kl_cov": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5},
    "clip_cov": {"clip_cov_ratio": 0.2, "clip_cov_lb": 0.1, "clip_cov_ub": 5.0},
}


def new_modes() -> dict:
    """verl's other loss modes and their drgrpo.verl.<mode> twins through ppo_loss, every loss_agg_mode, with and
    without rollout IS weights; clip_cov (random) under the same torch seed for both."""
    batch = ragged(12, 9, seed=15)
    info = {"dp_size": 2, "batch_num_tokens": int(batch["mask"].sum()) + 23, "global_batch_size": 12 + 5}
    cases = []
    for mode in NEW_MODES:
        for agg in AGG_MODES:
            for scale in (None, 20) if agg == "seq-mean-token-sum-norm" else (None,):
                for weights in (True, False) if agg == "token-mean" else (True,):
                    out = {}
                    for name in (mode, f"drgrpo.verl.{mode}"):
                        settings = NEW_MODE_SETTINGS.get(mode)
                        cfg = actor_config(name, settings, loss_agg_mode=agg, loss_scale_factor=scale)
                        torch.manual_seed(1234)  # clip_cov picks its tokens with torch.randperm
                        try:
                            out[name] = call_ppo_loss(cfg, batch, info, is_weights=weights)
                        except (ValueError, AssertionError) as err:
                            out[name] = {"error": f"{type(err).__name__}: {err}"}
                    ours = out[f"drgrpo.verl.{mode}"]
                    cases.append(
                        {"mode": mode, "agg": agg, "scale": scale, "weights": weights, "verl": out[mode], "ours": ours}
                    )
    return {"batch": batch, "info": info, "cases": cases, "settings": NEW_MODE_SETTINGS}


def bypass_mode() -> dict:
    """verl's bypass_mode and drgrpo.verl.bypass_mode through ppo_loss: both loss types, no / token / sequence IS
    weights (threshold 1.5), two loss_agg_modes; and the settings the twin refuses."""
    from verl.trainer.config import RolloutCorrectionConfig

    batch = ragged(12, 9, seed=16)
    info = {"dp_size": 2, "batch_num_tokens": int(batch["mask"].sum()) + 17, "global_batch_size": 12 + 3}
    cases = []
    for loss_type in ("ppo_clip", "reinforce"):
        for level in (None, "token", "sequence"):
            for agg in ("token-mean", "seq-mean-token-sum"):
                out = {}
                for name in ("bypass_mode", "drgrpo.verl.bypass_mode"):
                    rc = RolloutCorrectionConfig(rollout_is=level, rollout_is_threshold=1.5, loss_type=loss_type)
                    cfg = actor_config(name, {"rollout_correction": rc}, loss_agg_mode=agg)
                    out[name] = call_ppo_loss(cfg, batch, info, is_weights=True)  # both ignore the argument
                cases.append(
                    {"loss_type": loss_type, "level": level, "agg": agg, "verl": out["bypass_mode"],
                     "ours": out["drgrpo.verl.bypass_mode"]}
                )  # fmt: skip
    refused = {}
    for key, rc_settings in {
        "rs": {"rollout_rs": "token_k1", "rollout_rs_threshold": 2.0},
        "batch_normalize": {"rollout_is": "token", "rollout_is_batch_normalize": True},
        "icepop": {"rollout_is": "token", "rollout_is_threshold": "0.5_2.0", "loss_type": "reinforce"},
    }.items():
        cfg = actor_config("drgrpo.verl.bypass_mode", {"rollout_correction": RolloutCorrectionConfig(**rc_settings)})
        try:
            call_ppo_loss(cfg, batch, info)
            refused[key] = None
        except ValueError as err:
            refused[key] = f"ValueError: {err}"
    return {"batch": batch, "cases": cases, "refused": refused}


# (preset, verl actor settings) per split check; verl's defaults otherwise (clip_ratio* 0.2, clip_ratio_c 3)
SPLIT_CASES = {
    "dr_grpo": ("dr_grpo", {"loss_scale_factor": 16, "loss_agg_mode": "seq-mean-token-sum-norm"}),
    "grpo": ("grpo", {"loss_agg_mode": "seq-mean-token-mean"}),
    "dapo": ("dapo", {"clip_ratio_high": 0.28}),
    "bnpo": ("bnpo", {}),
    "gspo": ("gspo", {"loss_agg_mode": "seq-mean-token-mean"}),
    "cispo": ("cispo", {"clip_ratio_low": 1.0, "clip_ratio_high": 4.0}),
    "sapo": ("sapo", {}),
    # the mapping table's other rows: taus, no dual clip, the symmetric clip_ratio fallback, L for oat.drgrpo
    "sapo_taus": ("sapo", {"tau_pos": 1.3, "tau_neg": 0.9}),
    "grpo_no_dual_clip": ("grpo", {"clip_ratio_c": None, "loss_agg_mode": "seq-mean-token-mean"}),
    "dr_grpo_clip_ratio": (
        "dr_grpo",
        {
            "loss_agg_mode": "seq-mean-token-sum-norm",
            "loss_scale_factor": 20,
            "clip_ratio": 0.1,
            "clip_ratio_low": None,
            "clip_ratio_high": None,
            "clip_ratio_c": 5.0,
        },
    ),
    "oat_drgrpo_default_L": ("oat.drgrpo", {"loss_agg_mode": "seq-mean-token-sum-norm"}),
    # the twins of verl's other token-level modes (they follow loss_agg_mode; the mini-batch's counts)
    "verl_gpg": ("verl.gpg", {"loss_agg_mode": "seq-mean-token-mean"}),
    "verl_dro": ("verl.dro", {"policy_loss": {"dro_beta": 0.3}}),
    "verl_dppo_tv": ("verl.dppo_tv", {"loss_agg_mode": "seq-mean-token-sum"}),
    "verl_dppo_kl": ("verl.dppo_kl", {"clip_ratio_c": 2.0, "clip_ratio_high": 0.05}),
    "gmpo": ("gmpo", {"loss_agg_mode": "seq-mean-token-mean", "clip_ratio": 0.4, "clip_ratio_low": None}),
    # grpo's k3 KL (beta 0.04) through verl's own KL settings, aggregated like the preset's surrogate
    "grpo_with_verl_kl": (
        "grpo",
        {"use_kl_loss": True, "kl_loss_coef": 0.04, "kl_loss_type": "k3", "loss_agg_mode": "seq-mean-token-mean"},
    ),
}


def plugin_split() -> dict:
    """drgrpo.<preset> through ppo_loss: K uneven micro-batches of different widths on 1 and 2 ranks."""
    batch = ragged(24, 16, seed=6)
    out = {"batch": batch, "cases": SPLIT_CASES, "runs": []}
    for case, (preset, settings) in SPLIT_CASES.items():
        for ranks in (1, 2):
            for micro in (1, 3):
                factory = lambda p=preset, s=settings: actor_config(f"drgrpo.{p}", **s)
                kl = bool(settings.get("use_kl_loss"))
                run = split_run(factory, batch, ranks, micro, seed=100 * ranks + micro, kl=kl)
                out["runs"].append({"case": case, "ranks": ranks, "micro": micro, **run})
    # verl's geo_mean averages over each call's completions: its own and its twin's gradient under splits
    out["geo_mean"] = []
    for mode in ("geo_mean", "drgrpo.verl.geo_mean"):
        for ranks, micro in ((1, 1), (2, 3)):
            run = split_run(lambda m=mode: actor_config(m), batch, ranks, micro, seed=100 * ranks + micro)
            out["geo_mean"].append({"mode": mode, "ranks": ranks, "micro": micro, **run})
    # completions with no tokens count in global_batch_size (verl's trainer) and in our N_seq alike
    empty = ragged(24, 16, seed=12)
    empty["mask"][[3, 10, 17]] = 0.0
    out["empty_rows"] = {"batch": empty, "runs": []}
    for case in ("dr_grpo", "grpo", "dapo", "gspo"):
        preset, settings = SPLIT_CASES[case]
        factory = lambda p=preset, s=settings: actor_config(f"drgrpo.{p}", **s)
        run = split_run(factory, empty, 2, 3, seed=203)
        out["empty_rows"]["runs"].append({"case": case, **run})
    return out


PADDING_MODES = (("vanilla", {}), ("vanilla", {"loss_scale_factor": 16}), ("drgrpo.dr_grpo", {"loss_scale_factor": 16}))


def builtin_dr_grpo_padding() -> dict:
    """verl's built-in Dr. GRPO (vanilla, seq-mean-token-sum-norm) on micro-batches of different padded widths.

    ``trim=True``: each micro-batch padded to its own longest completion (verl's nested layout, the v1
    trainer); ``trim=False``: every micro-batch padded to the budget 16 (the legacy trainer's layout).
    """
    batch = ragged(32, 16, seed=7, min_len=1)
    g = torch.Generator().manual_seed(8)
    # outcome advantages of G = 4 groups with 0/1 rewards, no std (norm_adv_by_std_in_grpo=False)
    rewards = torch.randint(0, 2, (32,), generator=g).to(F64)
    batch["adv"] = (rewards.view(8, 4) - rewards.view(8, 4).mean(1, keepdim=True)).reshape(32)
    runs = []
    for ranks in (1, 2):
        for micro in (4,):
            for trimmed in (True, False):
                for mode, settings in PADDING_MODES:
                    factory = lambda m=mode, s=settings: actor_config(m, loss_agg_mode="seq-mean-token-sum-norm", **s)
                    run = split_run(factory, batch, ranks, micro, seed=10 * ranks + micro, trimmed=trimmed)
                    scale = settings.get("loss_scale_factor")
                    runs.append({"mode": mode, "scale": scale, "ranks": ranks, "trimmed": trimmed, **run})
    return {"batch": batch, "runs": runs}


def errors() -> dict:
    """The messages drgrpo's registered losses give verl users for missing information and bad input."""
    from drgrpo.integrations import verl as plugin

    batch = ragged(4, 5, seed=9)
    fn = core_algos.get_policy_loss_fn("drgrpo.dapo")
    full = {"dp_size": 1, "batch_num_tokens": int(batch["mask"].sum()), "global_batch_size": 4}
    messages = {}

    def attempt(key: str, call) -> None:
        try:
            call()
            messages[key] = None
        except (ValueError, TypeError) as err:
            messages[key] = f"{type(err).__name__}: {err}"

    def with_info(info: dict, mode: str = "drgrpo.dapo", adv=None, **settings):
        cfg = actor_config(mode, **settings)
        cfg.global_batch_info.update(info)
        a = batch["adv"].unsqueeze(-1) * batch["mask"] if adv is None else adv
        return core_algos.get_policy_loss_fn(mode)(
            batch["old"], batch["logp"], a, batch["mask"].bool(), cfg.loss_agg_mode, cfg
        )

    attempt("empty_info", lambda: with_info({}))
    for key in plugin.REQUIRED_BATCH_INFO:
        attempt(f"missing_{key}", lambda k=key: with_info({kk: v for kk, v in full.items() if kk != k}))
    attempt("none_global_batch_size", lambda: with_info({**full, "global_batch_size": None}))
    sum_norm = "seq-mean-token-sum-norm"
    attempt("dr_grpo_without_L", lambda: with_info(full, "drgrpo.dr_grpo", loss_agg_mode=sum_norm))
    attempt("dr_grpo_with_L", lambda: with_info(full, "drgrpo.dr_grpo", loss_scale_factor=8, loss_agg_mode=sum_norm))
    # a core preset's own aggregation against verl's loss_agg_mode (verl's default token-mean here)
    attempt("dr_grpo_token_mean", lambda: with_info(full, "drgrpo.dr_grpo", loss_scale_factor=8))
    attempt("grpo_token_sum", lambda: with_info(full, "drgrpo.grpo", loss_agg_mode="token-sum"))
    attempt("verl_dr_grpo_token_mean", lambda: with_info(full, "drgrpo.verl.dr_grpo", loss_scale_factor=8))
    attempt("twin_sum_norm_without_L", lambda: with_info(full, "drgrpo.verl.vanilla", loss_agg_mode=sum_norm))
    attempt("dro_without_beta", lambda: with_info(full, "drgrpo.verl.dro"))
    token_adv = batch["adv"].unsqueeze(-1) * batch["mask"] + 0.01 * batch["mask"].cumsum(-1)  # GAE-like
    attempt("token_level_advantages", lambda: with_info(full, adv=token_adv))
    attempt("bad_clip_ratio_c", lambda: with_info(full, clip_ratio_c=0.5))
    attempt(
        "config_none",
        lambda: fn(batch["old"], batch["logp"], batch["adv"].unsqueeze(-1), batch["mask"], "token-mean", None),
    )
    attempt("per_call_preset", lambda: plugin.register_losses(["trl.grpo"]))
    saved = core_algos.POLICY_LOSS_REGISTRY["drgrpo.sapo"]
    core_algos.POLICY_LOSS_REGISTRY["drgrpo.sapo"] = core_algos.get_policy_loss_fn("vanilla")
    attempt("name_taken", lambda: plugin.register_losses(["sapo"]))
    core_algos.POLICY_LOSS_REGISTRY["drgrpo.sapo"] = saved
    attempt("reregister_own", lambda: plugin.register_losses(["sapo"]))
    return messages


def advantages() -> dict:
    """verl's GRPO outcome advantage (with and without the std) on groups of 8 (two with equal rewards), singletons."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for dtype in (torch.float64, torch.float32):
        equal = torch.tensor([0.1] * 8 + [0.7] * 8, dtype=F64)
        rewards = torch.cat([torch.rand(32, generator=g, dtype=F64), equal]).to(dtype)  # 6 groups of 8
        index = np.repeat(np.arange(6), 8)
        for std in (True, False):
            scores = torch.zeros(48, 3, dtype=dtype)
            scores[:, -1] = rewards
            adv, _ = core_algos.compute_grpo_outcome_advantage(
                scores, torch.ones(48, 3, dtype=dtype), index, norm_adv_by_std_in_grpo=std
            )
            out[(str(dtype), std)] = {"rewards": rewards, "adv": adv[:, 0]}
        single = torch.tensor([0.7, -0.2], dtype=dtype)
        adv, _ = core_algos.compute_grpo_outcome_advantage(
            single.unsqueeze(-1), torch.ones(2, 1, dtype=dtype), np.arange(2), norm_adv_by_std_in_grpo=False
        )
        out[(str(dtype), "singleton")] = {"rewards": single, "adv": adv[:, 0]}
    return out


ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline", "opo", "grpo_passk", "gpg")


def estimators() -> dict:
    """verl's outcome estimators and drgrpo.<name>, each called as verl's trainer calls it (``compute_advantage``).

    Layouts: 5 prompts x 4 completions with interleaved uids, ragged lengths (1..9 tokens), zero rewards (gpg's
    alpha), a tie at the top (grpo_passk) and an equal-reward prompt; and 6 prompts of one completion each.
    """
    from verl.trainer.config import AlgoConfig

    def compute_advantage(scores, mask, index, est, norm):
        # verl.trainer.ppo.ray_trainer.compute_advantage's two outcome branches (that module needs cachetools,
        # which verl 0.9.1 does not install): "grpo" gets norm_adv_by_std_in_grpo as an argument; any other
        # name is looked up in the registry and called with token_level_rewards, response_mask, config, index
        cfg = AlgoConfig(adv_estimator=est, norm_adv_by_std_in_grpo=norm)
        if est == "grpo":
            return core_algos.compute_grpo_outcome_advantage(
                token_level_rewards=scores, response_mask=mask, index=index, norm_adv_by_std_in_grpo=norm
            )
        fn = core_algos.get_adv_estimator_fn(est)
        return fn(token_level_rewards=scores, response_mask=mask, config=cfg, index=index)

    g = torch.Generator().manual_seed(14)
    rows, width = 20, 9
    rewards = torch.rand(rows, generator=g, dtype=F64)
    uids = np.array([f"p{i % 5}" for i in range(rows)], dtype=object)  # prompt k: rows k, k + 5, k + 10, k + 15
    rewards[[0, 5]] = 0.0  # zero rewards
    rewards[[1, 6]] = 0.9  # prompt 1: a tie for the best reward (with rows 11, 16 lower)
    rewards[[11, 16]] = 0.2
    rewards[[2, 7, 12, 17]] = 0.3  # prompt 2: equal rewards
    layouts = {
        "groups": (rewards, uids, 1 + (width * torch.rand(rows, generator=g)).long().clamp(max=width - 1)),
        "singletons": (rewards[:6], np.array([f"s{i}" for i in range(6)], dtype=object), torch.arange(1, 7)),
    }
    out = {}
    for layout, (r, index, lengths) in layouts.items():
        mask = (torch.arange(width) < lengths.unsqueeze(1)).to(F64)
        scores = torch.zeros(len(r), width, dtype=F64)
        scores[torch.arange(len(r)), lengths - 1] = r  # verl puts the outcome reward on the last real token
        cases = []
        for name in ESTIMATORS:
            for norm in (True, False):
                got = {}
                for est in (name, f"drgrpo.{name}"):
                    try:
                        adv, returns = compute_advantage(scores.clone(), mask.clone(), index, est, norm)
                        got[est] = {"adv": adv, "returns": returns}
                    except ValueError as err:
                        got[est] = {"error": f"ValueError: {err}"}
                cases.append({"name": name, "norm": norm, "verl": got[name], "ours": got[f"drgrpo.{name}"]})
        out[layout] = {"rewards": r, "uids": list(index), "mask": mask, "cases": cases}
    out["registered"] = sorted(k for k in core_algos.ADV_ESTIMATOR_REGISTRY if k.startswith("drgrpo."))
    try:  # prompts with different numbers of completions
        uneven = np.array(["a", "a", "a", "b", "b"], dtype=object)
        compute_advantage(torch.ones(5, 2, dtype=F64), torch.ones(5, 2, dtype=F64), uneven, "drgrpo.rloo", True)
        out["uneven_groups"] = None
    except ValueError as err:
        out["uneven_groups"] = f"ValueError: {err}"
    return out


def main(path: str) -> None:
    torch.set_num_threads(1)
    results = {
        "entry_point": entry_point(),
        "builtin": builtin_parity(),
        "extreme_kl": extreme_kl(),
        "per_call": per_call_fallback(),
        "rollout_correction": rollout_correction(),
        "split": plugin_split(),
        "padding": builtin_dr_grpo_padding(),
        "errors": errors(),
        "twins": twins_follow_loss_agg_mode(),
        "estimators": estimators(),
        "new_modes": new_modes(),
        "bypass_mode": bypass_mode(),
        "advantages": advantages(),
    }
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])
