r"""Presets named after the peers' own options, so that the same name gives the same numbers.

``LossConfig.preset("trl.dr_grpo")`` is the loss TRL computes for ``GRPOConfig(loss_type="dr_grpo")`` with TRL's
defaults, quirks included; likewise ``verl.<loss_mode>`` (verl 0.9.1) and ``oat.<name>``. Overrides use the
:class:`~drgrpo.config.LossConfig` field names. Each preset states the peer version it was checked against
(``tests/peers/`` runs the peers' own code); the quirks each reproduces on purpose, and those it does not:
docs/design.md, section 9.3.
"""

from __future__ import annotations

from typing import Any

from drgrpo.config import LossConfig, register_preset
from drgrpo.presets import GROUP_STD

__all__ = ["PEER_PRESETS", "PEER_VERSIONS"]

PEER_VERSIONS: dict[str, str] = {
    "trl": "trl 1.16.0 (trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss)",
    "verl": "verl 0.9.1 (verl/trainer/ppo/core_algos.py, verl/workers/utils/losses.py; run live in .venv-verl)",
    "oat": "oat main (oat/algorithms/ppo.py, PPOLearner.learning_step)",
}
"""The peer code each family of presets was checked against."""

# ----------------------------------------------------------------------------------------- TRL
# GRPOConfig defaults: epsilon=0.2, epsilon_high=None -> epsilon, beta=0.0, scale_rewards="group",
# max_completion_length=512, sapo temperatures 1.0 / 1.05, use_bias_correction_kl=True.
_TRL_ADVANTAGES: dict[str, Any] = dict(
    advantage_std="group", std_unbiased=True, std_eps=1e-4, nan_rewards="ignore", kl="k3", kl_importance_weight=True
)


@register_preset("trl.grpo")
def _trl_grpo() -> LossConfig:
    """TRL ``loss_type="grpo"``: ``mean_i (sum_t l m / |o_i|)`` over each micro-batch.

    Per call by definition: refuses a step normaliser.
    """
    return LossConfig(
        aggregation="seq-mean-token-mean",
        beta=0.0,
        per_call_normalization=True,
        name="trl.grpo",
        **_TRL_ADVANTAGES,
    )


@register_preset("trl.bnpo")
def _trl_bnpo() -> LossConfig:
    """TRL ``loss_type="bnpo"``: ``sum l m / sum m`` over each micro-batch (per call: refuses a normaliser)."""
    return LossConfig(
        aggregation="token-mean", beta=0.0, per_call_normalization=True, name="trl.bnpo", **_TRL_ADVANTAGES
    )


@register_preset("trl.dr_grpo")
def _trl_dr_grpo() -> LossConfig:
    """TRL ``loss_type="dr_grpo"``: ``sum l m / (B_micro * L)`` per micro-batch (per call: refuses a normaliser)."""
    # loss = sum l m / (B_micro * max_completion_length), WITH TRL's std scaling (scale_rewards="group"
    # is TRL's default for every loss type); the paper's Dr. GRPO also drops it: scale_rewards="none"
    # is advantage_std="none".
    return LossConfig(
        aggregation="seq-mean-token-sum-norm",
        max_completion_length=512,
        beta=0.0,
        per_call_normalization=True,
        name="trl.dr_grpo",
        **_TRL_ADVANTAGES,
    )


@register_preset("trl.dapo")
def _trl_dapo() -> LossConfig:
    # loss = sum l m / (tokens of the whole generation batch / processes): token-mean over the step.
    # TRL does not turn on clip-higher for loss_type="dapo": pass clip_high=0.28 (epsilon_high).
    return LossConfig(aggregation="token-mean", beta=0.0, name="trl.dapo", **_TRL_ADVANTAGES)


@register_preset("trl.cispo")
def _trl_cispo() -> LossConfig:
    # l = -sg(min(r, epsilon_high)) A logp: the cap is epsilon_high itself (default 0.2!), no lower bound.
    return LossConfig(
        surrogate="cispo",
        clip_low=None,
        cispo_cap=0.2,
        aggregation="token-mean",
        beta=0.0,
        name="trl.cispo",
        **_TRL_ADVANTAGES,
    )


@register_preset("trl.sapo")
def _trl_sapo() -> LossConfig:
    # l = -(4/tau) sigmoid(tau (r - 1)) A, tau = 1.0 if A > 0 else 1.05; per-response mean like "grpo".
    return LossConfig(
        surrogate="sapo",
        sapo_tau_pos=1.0,
        sapo_tau_neg=1.05,
        aggregation="seq-mean-token-mean",
        beta=0.0,
        name="trl.sapo",
        **_TRL_ADVANTAGES,
    )


@register_preset("trl.vespo")
def _trl_vespo() -> LossConfig:
    # l = -sg(phi(w)) A logp with TRL's gamma weights (k, lambda) = (2, 3) for A >= 0 and (3, 2) below; the
    # sampler correction's weight is folded into w (TRL multiplies nothing). Aggregated like "dapo".
    return LossConfig(surrogate="vespo", aggregation="token-mean", beta=0.0, name="trl.vespo", **_TRL_ADVANTAGES)


@register_preset("trl.luspo")
def _trl_luspo() -> LossConfig:
    """TRL ``loss_type="luspo"``: the PPO clip, ``mean_i (sum_t l m)`` over each micro-batch (each completion's
    loss scaled by its length), divided by the accumulation steps. Per call by definition: refuses a normaliser.

    TRL's default ratio level is ``token``; the LUSPO paper (and TRL's warning) asks for ``ratio_level="sequence"``.
    """
    return LossConfig(
        aggregation="seq-mean-token-sum",
        beta=0.0,
        per_call_normalization=True,
        name="trl.luspo",
        **_TRL_ADVANTAGES,
    )


# ---------------------------------------------------------------------------------------- verl
# ActorConfig defaults: clip_ratio(_low/_high)=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean",
# loss_scale_factor=None, tau_pos=1.0, tau_neg=1.05, use_kl_loss=False (kl_loss_coef=0.001,
# kl_loss_type="low_var_kl"). compute_grpo_outcome_advantage: epsilon=1e-6, torch.std (unbiased).
_VERL_ADVANTAGES: dict[str, Any] = dict(
    advantage_std="group", std_unbiased=True, std_eps=1e-6, singleton_advantage="reward", kl="low_var_kl"
)


@register_preset("verl.vanilla")
def _verl_vanilla() -> LossConfig:
    # PPO clip plus dual clip: for A < 0 the loss is capped at -3 A.
    return LossConfig(dual_clip=3.0, aggregation="token-mean", beta=0.0, name="verl.vanilla", **_VERL_ADVANTAGES)


@register_preset("verl.grpo")
def _verl_grpo() -> LossConfig:
    # adv_estimator=grpo with loss_mode=vanilla and verl's defaults (what verl's GRPO recipes start from).
    return LossConfig(dual_clip=3.0, aggregation="token-mean", beta=0.0, name="verl.grpo", **_VERL_ADVANTAGES)


@register_preset("verl.dr_grpo")
def _verl_dr_grpo() -> LossConfig:
    """verl's Dr. GRPO recipe: ``sum_{i,t} l m / (N_seq L)``, L = ``loss_scale_factor`` (required here).

    verl 0.9.1's ``seq-mean-token-sum-norm``: the sum over a micro-batch's completions divided by the
    mini-batch's completion count ``global_batch_size`` (times ``dp_size``), then by L. With a constant L
    this is split-invariant (use a step normaliser); verl's default L, the padded width of each
    micro-batch, is not a constant and is refused.
    """
    # norm_adv_by_std_in_grpo=False, loss_agg_mode="seq-mean-token-sum-norm", vanilla loss (dual clip 3).
    return LossConfig(
        dual_clip=3.0,
        aggregation="seq-mean-token-sum-norm",
        max_completion_length=None,
        beta=0.0,
        name="verl.dr_grpo",
        **{**_VERL_ADVANTAGES, "advantage_std": "none"},
    )


@register_preset("verl.gspo")
def _verl_gspo() -> LossConfig:
    # Sequence ratio exp(mean_t log r_t), PPO clip on it (verl's default 0.2; the GSPO recipe passes
    # clip_low=3e-4, clip_high=4e-4), aggregated with loss_agg_mode (verl's default token-mean); no dual clip.
    return LossConfig(
        ratio_level="sequence",
        aggregation="token-mean",
        beta=0.0,
        name="verl.gspo",
        **_VERL_ADVANTAGES,
    )


@register_preset("verl.cispo")
def _verl_cispo() -> LossConfig:
    # l = -sg(clip(r, 1 - 0.2, 1 + 0.2)) A logp: two-sided, unlike TRL's cap-only CISPO.
    return LossConfig(surrogate="cispo", aggregation="token-mean", beta=0.0, name="verl.cispo", **_VERL_ADVANTAGES)


@register_preset("verl.sapo")
def _verl_sapo() -> LossConfig:
    # The surrogate is aggregated with seq-mean-token-mean whatever loss_agg_mode says; verl's KL term follows
    # loss_agg_mode, so with beta > 0 only aggregation="seq-mean-token-mean" is the same loss (others raise).
    return LossConfig(
        surrogate="sapo",
        sapo_tau_pos=1.0,
        sapo_tau_neg=1.05,
        aggregation="seq-mean-token-mean",
        forced_aggregation="seq-mean-token-mean",
        beta=0.0,
        name="verl.sapo",
        **_VERL_ADVANTAGES,
    )


@register_preset("verl.gpg")
def _verl_gpg() -> LossConfig:
    # l = -A logp (no ratio, no clip), aggregated with loss_agg_mode (default token-mean).
    return LossConfig(surrogate="gpg", aggregation="token-mean", beta=0.0, name="verl.gpg", **_VERL_ADVANTAGES)


@register_preset("verl.dro")
def _verl_dro() -> LossConfig:
    # l = -(A logp - dro_beta / 2 (logp - old)^2); verl has no default dro_beta (pass dro_beta=).
    return LossConfig(surrogate="dro", aggregation="token-mean", beta=0.0, name="verl.dro", **_VERL_ADVANTAGES)


@register_preset("verl.dppo_tv")
def _verl_dppo_tv() -> LossConfig:
    # l = -A sg(min(r, 3)) logp where p - p_old stays within 0.2 (clip_ratio_low/high), else 0; c = clip_ratio_c.
    return LossConfig(
        surrogate="dppo_tv", dppo_cap=3.0, aggregation="token-mean", beta=0.0, name="verl.dppo_tv", **_VERL_ADVANTAGES
    )


@register_preset("verl.dppo_kl")
def _verl_dppo_kl() -> LossConfig:
    # as verl.dppo_tv with the binary KL between p_old and p as the trust region.
    return LossConfig(
        surrogate="dppo_kl", dppo_cap=3.0, aggregation="token-mean", beta=0.0, name="verl.dppo_kl", **_VERL_ADVANTAGES
    )


@register_preset("verl.kl_cov")
def _verl_kl_cov() -> LossConfig:
    # -A r, plus 0.1 |logp - old| on the 0.02% of the call's tokens of largest cov(A, logp) (at least one).
    return LossConfig(surrogate="kl_cov", aggregation="token-mean", beta=0.0, name="verl.kl_cov", **_VERL_ADVANTAGES)


@register_preset("verl.clip_cov")
def _verl_clip_cov() -> LossConfig:
    # PPO clip 0.2 (no dual clip); the loss of 0.02% of the call's tokens (at least one), drawn among those with
    # 1 < cov(A, logp) < 5 that the clip leaves alone, set to 0.
    return LossConfig(
        surrogate="clip_cov", aggregation="token-mean", beta=0.0, name="verl.clip_cov", **_VERL_ADVANTAGES
    )


@register_preset("verl.geo_mean")
def _verl_geo_mean() -> LossConfig:
    # GMPO: -A rho_i per completion, averaged over the completions of each call (verl's torch.mean over the
    # micro-batch's rows, whatever loss_agg_mode and global_batch_info say): per call by definition.
    return LossConfig(
        surrogate="geo_mean",
        aggregation="seq-mean-token-mean",
        forced_aggregation="seq-mean-token-mean",
        per_call_normalization=True,
        beta=0.0,
        name="verl.geo_mean",
        **_VERL_ADVANTAGES,
    )


# ----------------------------------------------------------------------------------------- oat
# OATArgs/PPOArgs defaults: cliprange=0.2, generate_max_length=512, beta=0.1 (the Dr. GRPO recipes of
# understand-r1-zero pass --beta 0, used here), k3 KL, torch.std (unbiased) + 1e-8 for "grpo".


@register_preset("oat.grpo")
def _oat_grpo() -> LossConfig:
    return LossConfig(aggregation="seq-mean-token-mean", kl="k3", beta=0.0, name="oat.grpo", **GROUP_STD)


@register_preset("oat.drgrpo")
def _oat_drgrpo() -> LossConfig:
    # Modification 1: masked_sum(l, m, axis=1) / generate_max_length, then the mean over completions.
    # Modification 2: advantages r - mean_group(r), no std.
    return LossConfig(
        aggregation="seq-mean-token-sum-norm",
        max_completion_length=512,
        advantage_std="none",
        kl="k3",
        beta=0.0,
        name="oat.drgrpo",
    )


PEER_PRESETS: tuple[str, ...] = (
    "trl.grpo",
    "trl.bnpo",
    "trl.dr_grpo",
    "trl.dapo",
    "trl.cispo",
    "trl.sapo",
    "trl.vespo",
    "trl.luspo",
    "verl.vanilla",
    "verl.grpo",
    "verl.dr_grpo",
    "verl.gspo",
    "verl.cispo",
    "verl.sapo",
    "verl.gpg",
    "verl.dro",
    "verl.dppo_tv",
    "verl.dppo_kl",
    "verl.geo_mean",
    "verl.kl_cov",
    "verl.clip_cov",
    "oat.grpo",
    "oat.drgrpo",
)
"""Every preset this module registers."""
