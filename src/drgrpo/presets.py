"""The papers' losses as named presets: Dr. GRPO, GRPO, DAPO, BNPO, GSPO, CISPO, SAPO and the specification.

Each preset is a :class:`~drgrpo.config.LossConfig` with the choices its paper states, registered
under its name; ``LossConfig.preset("dr_grpo", max_completion_length=L)`` looks it up. The presets
named after other frameworks' options (``trl.*``, ``verl.*``, ``oat.*``) are in :mod:`drgrpo.peers`.
"""

from __future__ import annotations

from typing import Any

from drgrpo.config import LossConfig, register_preset

GROUP_STD: dict[str, Any] = dict(advantage_std="group", std_unbiased=True, std_eps=1e-8)
"""GRPO's advantage scaling, ``(r - mean_group) / (std_unbiased + 1e-8)``, shared by the core presets that keep it."""


@register_preset("dr_grpo")
def _dr_grpo() -> LossConfig:
    # Liu et al. 2025 (arXiv 2503.20783), Dr. GRPO:
    #   Modification 1: remove the length bias -> divide by a constant L, not by |o_i|.
    #   Modification 2: remove the difficulty bias -> no std division of the advantage.
    # beta = 0, eps = 0.2 as in the paper's runs.
    return LossConfig(aggregation="seq-mean-token-sum-norm", advantage_std="none", beta=0.0, name="dr_grpo")


@register_preset("grpo")
def _grpo() -> LossConfig:
    # Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300): group std, per-response 1/|o_i|, k3 KL.
    return LossConfig(
        aggregation="seq-mean-token-mean",
        **GROUP_STD,
        kl="k3",
        beta=0.04,
        name="grpo",
    )


@register_preset("dapo")
def _dapo() -> LossConfig:
    # Yu et al. 2025 (arXiv 2503.14476): clip-higher 0.2/0.28, token-level mean, no KL.
    return LossConfig(
        aggregation="token-mean",
        **GROUP_STD,
        clip_low=0.2,
        clip_high=0.28,
        beta=0.0,
        name="dapo",
    )


@register_preset("bnpo")
def _bnpo() -> LossConfig:
    # Batch-normalised policy optimisation: GRPO advantages, token-level mean over the batch.
    return LossConfig(aggregation="token-mean", beta=0.0, name="bnpo", **GROUP_STD)


@register_preset("gspo")
def _gspo() -> LossConfig:
    # Zheng et al. 2025 (arXiv 2507.18071): sequence-level ratio exp(mean_t log r_t), tiny clip range.
    return LossConfig(
        ratio_level="sequence",
        clip_low=3e-4,
        clip_high=4e-4,
        aggregation="seq-mean-token-mean",
        **GROUP_STD,
        beta=0.0,
        name="gspo",
    )


@register_preset("cispo")
def _cispo() -> LossConfig:
    # MiniMax-M1 (arXiv 2506.13585): REINFORCE with a clipped, stop-gradient IS weight; upper cap only.
    return LossConfig(
        surrogate="cispo",
        clip_low=None,
        clip_high=4.0,
        aggregation="token-mean",
        **GROUP_STD,
        beta=0.0,
        name="cispo",
    )


@register_preset("sapo")
def _sapo() -> LossConfig:
    # Soft adaptive policy optimisation (arXiv 2511.20347): sigmoid gate instead of a hard clip.
    return LossConfig(
        surrogate="sapo",
        sapo_tau_pos=1.0,
        sapo_tau_neg=1.05,
        aggregation="token-mean",
        **GROUP_STD,
        beta=0.0,
        name="sapo",
    )


@register_preset("seed")
def _seed() -> LossConfig:
    # The specification (docs/specification.md): population std, all-zero advantages when std < 1e-8,
    # PPO clip 0.2, k1 KL with beta 0.04, mean over completions. With one token per completion,
    # policy_loss under this preset equals drgrpo.dr_grpo_objective.
    return LossConfig(
        aggregation="seq-mean-token-mean",
        advantage_std="group",
        std_unbiased=False,
        std_eps=0.0,
        std_zero_threshold=1e-8,
        kl="k1",
        beta=0.04,
        name="seed",
    )


@register_preset("gmpo")
def _gmpo() -> LossConfig:
    # GMPO (arXiv 2507.20673): geometric-mean ratio per completion, token log-ratios clipped to [-0.4, 0.4]
    # (the paper's wider clip, e^0.4), the mean over the step's completions.
    return LossConfig(
        surrogate="geo_mean", clip_low=0.4, clip_high=0.4, aggregation="seq-mean-token-mean", name="gmpo", **GROUP_STD
    )
