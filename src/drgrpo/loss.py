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


@dataclass
class LossOutput:
    """What a loss call returns: the scalar to backpropagate and detached metrics."""

    loss: Tensor
    """Scalar, float32 for half-precision inputs, else the inputs' dtype."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Detached scalars: clip_frac_low, clip_frac_high, ratio_mean, kl_mean, num_tokens."""
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

    member = get_surrogate(config.surrogate)  # drgrpo.surrogates registers ppo, cispo, sapo, ...
    term = member.loss(SurrogateInputs(ratio, adv, logp, old, m), config)
    loss = term.loss

    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.to(dtype).masked_fill(~real, 0.0), config.kl)
        if config.beta != 0:
            # TRL's use_bias_correction_kl: weight the KL by the unclipped ratio (gradient flows through it)
            loss = loss + config.beta * (kl * ratio if config.kl_importance_weight else kl)
    return PerTokenLoss(loss * m, ratio, term.clipped_low & real, term.clipped_high & real, kl)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    config: LossConfig,
    *,
    ref_logp: Tensor | None = None,
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
        normalizer: a :class:`~drgrpo.normalizer.StepNormalizer` with the whole optimizer step's counts,
            so that summing this over micro-batches (and DDP-averaging over processes) equals the
            whole batch's loss; ``None`` normalises by this batch's own counts.
        validate: check the mask's values and finiteness on real tokens (reads the data: a device sync); types,
            shapes and devices are checked either way.

    Returns:
        :class:`LossOutput` with ``loss`` (scalar; float32 for bf16/fp16 inputs) and detached metrics
        ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, ``kl_mean`` (over real tokens) and ``num_tokens``.
    """
    validate_inputs(logp, old_logp, advantages, mask, config, ref_logp, values=validate)
    terms = per_token_loss(logp, old_logp, advantages, mask, config, ref_logp)
    weights = token_weights(mask.to(terms.loss.dtype), config, normalizer)
    loss = (terms.loss * weights).sum()
    return LossOutput(loss=loss, metrics=loss_metrics(terms, mask))


def loss_metrics(terms: PerTokenLoss, mask: Tensor) -> dict[str, Tensor]:
    """Detached masked means over real tokens (no ``.item()``: no device sync)."""
    with torch.no_grad():
        m = mask.to(terms.ratio.dtype)
        count = m.sum()
        denom = count.clamp_min(1)
        kl_mean = (terms.kl * m).sum() / denom if terms.kl is not None else torch.zeros_like(count)
        return {
            "clip_frac_low": (terms.clipped_low.to(m.dtype) * m).sum() / denom,
            "clip_frac_high": (terms.clipped_high.to(m.dtype) * m).sum() / denom,
            "ratio_mean": (terms.ratio * m).sum() / denom,
            "kl_mean": kl_mean,
            "num_tokens": count,
        }


def validate_inputs(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    config: LossConfig,
    ref_logp: Tensor | None,
    *,
    values: bool = True,
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
    check_same_device("logp", logp, mask=mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp)
    if config.beta > 0 and ref_logp is None:
        raise ValueError(f"config.beta={config.beta} > 0 needs ref_logp (B, T); pass it or set beta=0")
    if not values:
        return
    check_mask("mask", mask)
    check_finite("advantages", advantages)
    check_finite_where("logp", logp, mask)
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if other is not None:
            check_finite_where(name, other, mask)
