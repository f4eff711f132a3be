r"""The token-level GRPO-family policy loss (PyTorch, batched, masked, differentiable).

For B completions of T tokens (mask m), advantages A (B,) and importance ratios r (B, T)::

    l_{i,t} = surrogate(r_{i,t}, A_i) + beta * kl(logp_{i,t}, ref_{i,t})       # drgrpo.surrogates, drgrpo.kl
    loss    = sum_{i,t} w_{i,t} l_{i,t}                                        # drgrpo.aggregation

Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) is this loss with the PPO surrogate, advantages
``r - mean_group(r)`` (no std) and ``w = m / (B * L)`` for a constant L, so that every token of
every completion has gradient weight ``A_i / (B * L)``; GRPO's ``w = m / (B * |o_i|)`` gives
``A_i / (B * |o_i|)``: a long wrong answer is penalised less per token than a short one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from drgrpo.aggregation import token_weights
from drgrpo.config import LossConfig
from drgrpo.correction import off_policy_keep, sampling_metrics, sampling_weight
from drgrpo.entropy import entropy_bonus, high_entropy_mask
from drgrpo.entropy import entropy_threshold as high_entropy_threshold
from drgrpo.kl import kl_penalty
from drgrpo.surrogates import SurrogateInputs, get_surrogate, sequence_log_ratio, token_log_ratio
from drgrpo.validation import (
    as_tensor,
    check_finite,
    check_finite_where,
    check_floating,
    check_mask,
    check_same_device,
    check_shape,
)

if TYPE_CHECKING:
    from drgrpo.normalizer import StepNormalizer


class PerTokenLoss(NamedTuple):
    loss: Tensor  # (B, T) surrogate + beta * kl, 0 on padding
    ratio: Tensor  # (B, T) importance ratio (s_i on every token at sequence level)
    clipped_low: Tensor  # (B, T) bool
    clipped_high: Tensor  # (B, T) bool
    kl: Tensor | None  # (B, T) per-token KL, or None without ref_logp
    sampling_weight: Tensor | None = None  # (B, T) the sampler correction's weight rho (config.sampling_correction)
    keep: Tensor | None = None  # (B, 1) the off-policy mask (config.off_policy_mask_threshold)
    sequence_weight: Tensor | None = None  # (B, 1) the surrogate's own weight of each completion (VESPO's phi)


@dataclass
class LossOutput:
    """What a loss call returns: the scalar to backpropagate and detached metrics."""

    loss: Tensor
    """Scalar, float32 for half-precision inputs, else the inputs' dtype."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Detached scalars: clip_frac_low, clip_frac_high, ratio_mean, kl_mean, num_tokens (and the others
    :func:`policy_loss` lists)."""
    logp: Tensor | None = None
    """Detached per-token log-probs ``(B, T)`` (set by the fused path)."""
    entropy: Tensor | None = None
    """Detached per-token entropies of the policy ``(B, T)`` (set by the fused path with ``compute_entropy``)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_token_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    config: LossConfig,
    ref_logp: Tensor | None = None,
    sampling_logp: Tensor | None = None,
    entropy_keep: Tensor | None = None,
) -> PerTokenLoss:
    """The unaggregated loss ``l`` ``(B, T)``; no input checks (see :func:`policy_loss`).

    Tokens of different rows never interact, so this can be evaluated on any subset of rows
    (the fused path does). Padding positions of every input are ignored (replaced by 0).
    """
    dtype = compute_dtype(logp.dtype)
    real = mask.bool()
    m = real.to(dtype)
    logp = logp.to(dtype).masked_fill(~real, 0.0)
    old = logp.detach() if old_logp is None else old_logp.to(dtype).masked_fill(~real, 0.0)
    adv = advantages.to(dtype).unsqueeze(-1)  # (B, 1), broadcast over tokens

    if config.ratio_level == "sequence":
        log_ratio = sequence_log_ratio(logp, old, m)  # (B, T): log s_i on every token of row i
    else:
        log_ratio = token_log_ratio(logp, old)
    ratio = torch.exp(log_ratio)

    rho = None
    if config.sampling_correction is not None:
        assert sampling_logp is not None  # validate_inputs enforces it
        rho = sampling_weight(
            old, sampling_logp, real, config.sampling_correction, config.sampling_clip_min, config.sampling_clip_max
        )
    member = get_surrogate(config.surrogate)  # drgrpo.surrogates registers ppo, cispo, sapo, ...
    term = member.loss(SurrogateInputs(ratio, adv, logp, old, m, rho), config)
    loss = term.loss
    if rho is not None and not member.folds_sampling_weight:
        loss = loss * rho  # TRL: the surrogate times the sampler correction (not the KL term)
    keep = None
    if config.off_policy_mask_threshold is not None:
        source = old if sampling_logp is None else sampling_logp  # the sampler's log-probs when there are any
        keep = off_policy_keep(adv, logp, source, real, config.off_policy_mask_threshold)
        loss = loss * keep
    if entropy_keep is not None:
        loss = loss * entropy_keep.to(dtype)  # the high-entropy token mask (its threshold: policy_loss)

    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.to(dtype).masked_fill(~real, 0.0), config.kl)
        if config.beta != 0:
            # TRL's use_bias_correction_kl: weight the KL by the unclipped ratio (gradient flows through it)
            loss = loss + config.beta * (kl * ratio if config.kl_importance_weight else kl)
    clipped_low, clipped_high = term.clipped_low & real, term.clipped_high & real
    return PerTokenLoss(loss * m, ratio, clipped_low, clipped_high, kl, rho, keep, term.weight)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    config: LossConfig,
    *,
    ref_logp: Tensor | None = None,
    sampling_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_threshold: Tensor | float | None = None,
    normalizer: StepNormalizer | None = None,
    validate: bool = True,
) -> LossOutput:
    r"""The GRPO-family policy loss of one batch, ``sum_{i,t} w_{i,t} l_{i,t}``.

    Args:
        logp: ``(B, T)`` log pi_theta of the sampled completion tokens (requires grad).
        old_logp: ``(B, T)`` log pi_old from the sampling policy, or ``None`` for on-policy (ratio 1,
            gradient still flows through ``logp``).
        advantages: ``(B,)`` one advantage per completion, e.g. from :func:`~drgrpo.group_advantages`.
        mask: ``(B, T)`` 0/1 (bool, int or float): 1 on real completion tokens.
        config: a :class:`~drgrpo.config.LossConfig`, e.g. ``LossConfig.preset("dr_grpo", max_completion_length=L)``.
        ref_logp: ``(B, T)`` log pi_ref; required when ``config.beta > 0``.
        sampling_logp: ``(B, T)`` the sampler's own log-probs of the tokens (vLLM's); required by
            ``config.sampling_correction``, read by ``config.off_policy_mask_threshold``. NaN on a real token means
            "not scored": it counts as d = 0 (:mod:`drgrpo.correction`).
        entropy: ``(B, T)`` each token's policy entropy, differentiable for the bonus; required by
            ``config.top_entropy_quantile < 1`` and ``config.entropy_coef != 0`` (:mod:`drgrpo.entropy`).
        entropy_threshold: the mask's entropy threshold; ``None`` computes it from this call's real tokens (TRL's
            per-micro-batch definition), which a step ``normalizer`` refuses: pass the step's threshold
            (:func:`drgrpo.entropy.entropy_threshold` over the whole step) for the same gradient for any split.
        normalizer: a :class:`~drgrpo.normalizer.StepNormalizer` with the whole optimizer step's counts,
            so that summing this over micro-batches (and DDP-averaging over processes) equals the
            whole batch's loss; ``None`` normalises by this batch's own counts.
        validate: check the mask's values and finiteness on real tokens (reads the data: a device sync); types,
            shapes and devices are checked either way.

    Returns:
        :class:`LossOutput` with ``loss`` (scalar; float32 for bf16/fp16 inputs) and detached metrics
        ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, ``kl_mean`` (over real tokens) and ``num_tokens``; with
        ``sampling_logp``, ``sampling_logp_difference_mean/max`` and (with a correction)
        ``importance_sampling_ratio_min/mean/max`` (:func:`drgrpo.correction.sampling_metrics`); with the ``vespo``
        surrogate, ``vespo_phi_mean``, its Gamma weight ``phi(w_i)`` averaged over the ``B`` completions (empty ones
        included, as TRL's ``vespo/phi_seq_mean``).
    """
    validate_inputs(logp, old_logp, advantages, mask, config, ref_logp, values=validate, sampling_logp=sampling_logp)
    check_entropy_inputs(config, logp, entropy, entropy_threshold, normalizer)
    keep = None
    if config.top_entropy_quantile < 1:
        assert entropy is not None
        if entropy_threshold is None:
            entropy_threshold = high_entropy_threshold(entropy, mask, config.top_entropy_quantile)
        keep = high_entropy_mask(entropy, mask, entropy_threshold)
    terms = per_token_loss(logp, old_logp, advantages, mask, config, ref_logp, sampling_logp, keep)
    weights = token_weights(mask.to(terms.loss.dtype), config, normalizer)
    loss = (terms.loss * weights).sum()
    metrics = loss_metrics(terms, mask)
    if entropy is not None:
        h = entropy.to(weights.dtype).masked_fill(~mask.bool(), 0.0)
        with torch.no_grad():
            metrics["entropy_mean"] = h.sum() / mask.sum().clamp_min(1).to(h.dtype)
        if config.entropy_coef != 0:
            acting = mask if keep is None else keep  # the bonus acts on the tokens the loss trains on
            loss = loss - entropy_bonus(h, acting, config.entropy_coef, normalizer)
    if sampling_logp is not None:
        old = logp.detach() if old_logp is None else old_logp
        sequence = (config.sampling_correction or "").startswith("sequence")
        metrics.update(sampling_metrics(old.to(weights.dtype), sampling_logp, mask, terms.sampling_weight, sequence))
    return LossOutput(loss=loss, metrics=metrics)


def loss_metrics(terms: PerTokenLoss, mask: Tensor) -> dict[str, Tensor]:
    """Detached masked means over real tokens (no ``.item()``: no device sync); a surrogate's per-completion
    weight (VESPO's phi) is averaged over the completions, as ``vespo_phi_mean``."""
    with torch.no_grad():
        m = mask.to(terms.ratio.dtype)
        count = m.sum()
        denom = count.clamp_min(1)
        kl_mean = (terms.kl * m).sum() / denom if terms.kl is not None else torch.zeros_like(count)
        metrics = {
            "clip_frac_low": (terms.clipped_low.to(m.dtype) * m).sum() / denom,
            "clip_frac_high": (terms.clipped_high.to(m.dtype) * m).sum() / denom,
            "ratio_mean": (terms.ratio * m).sum() / denom,
            "kl_mean": kl_mean,
            "num_tokens": count,
        }
        if terms.sequence_weight is not None:
            metrics["vespo_phi_mean"] = terms.sequence_weight.detach().sum() / max(terms.sequence_weight.numel(), 1)
        return metrics


def check_entropy_inputs(
    config: LossConfig,
    logp: Tensor,
    entropy: Tensor | None,
    threshold: Tensor | float | None,
    normalizer: StepNormalizer | None,
) -> None:
    """The entropy inputs the config needs: ``entropy (B, T)`` for the mask and the bonus, and a step's threshold
    when a step normaliser splits the step."""
    if entropy is not None:
        entropy = as_tensor("entropy", entropy)
        check_floating("entropy", entropy)
        check_shape("entropy", entropy, tuple(logp.shape), "(B, T)")
        check_same_device("logp", logp, entropy=entropy)
    needs = []
    if config.top_entropy_quantile < 1:
        needs.append(f"top_entropy_quantile={config.top_entropy_quantile}")
    if config.entropy_coef != 0:
        needs.append(f"entropy_coef={config.entropy_coef}")
    if needs and entropy is None:
        raise ValueError(
            f"config.{' and config.'.join(needs)} needs entropy (B, T), each token's policy entropy; pass it "
            "(fused_policy_loss computes it)"
        )
    if config.top_entropy_quantile < 1 and threshold is None and normalizer is not None:
        raise ValueError(
            "config.top_entropy_quantile < 1 with a step normalizer needs entropy_threshold, one per step "
            "(drgrpo.entropy.entropy_threshold over the whole step's entropies): a threshold per micro-batch would "
            "make the gradient depend on the split"
        )


def validate_inputs(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    config: LossConfig,
    ref_logp: Tensor | None,
    *,
    values: bool = True,
    sampling_logp: Tensor | None = None,
) -> None:
    """Raise a ValueError/TypeError naming the first bad argument: types, shapes and devices, then (with
    ``values``) the mask's values and NaN/inf on real tokens, which read the data (a device sync)."""
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    logp = as_tensor("logp", logp)
    check_floating("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be 2-D (B, T), got shape {tuple(logp.shape)}")
    b, t = logp.shape
    mask = as_tensor("mask", mask)
    check_shape("mask", mask, (b, t), "(B, T)")
    advantages = as_tensor("advantages", advantages)
    check_floating("advantages", advantages)
    check_shape("advantages", advantages, (b,), "(B,)")
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if other is not None:
            other = as_tensor(name, other)
            check_floating(name, other)
            check_shape(name, other, (b, t), "(B, T)")
    if sampling_logp is not None:
        sampling_logp = as_tensor("sampling_logp", sampling_logp)
        check_floating("sampling_logp", sampling_logp)
        check_shape("sampling_logp", sampling_logp, (b, t), "(B, T)")
    others = dict(mask=mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp, sampling_logp=sampling_logp)
    check_same_device("logp", logp, **others)
    if config.beta > 0 and ref_logp is None:
        raise ValueError(f"config.beta={config.beta} > 0 needs ref_logp (B, T); pass it or set beta=0")
    if config.sampling_correction is not None and sampling_logp is None:
        raise ValueError(
            f"config.sampling_correction={config.sampling_correction!r} needs sampling_logp (B, T), the sampler's "
            "log-probs; pass it or set sampling_correction=None"
        )
    if not values:
        return
    check_mask("mask", mask)
    check_finite("advantages", advantages)
    check_finite_where("logp", logp, mask)
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if other is not None:
            check_finite_where(name, other, mask)
