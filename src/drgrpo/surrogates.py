"""Per-token policy-gradient surrogates (negated, to minimise), as pure functions of ``(B, T)`` tensors.

``ratio`` is the importance ratio pi_theta / pi_old per token (token level) or the same value
s_i for every token of completion i (sequence level, GSPO), ``adv`` the advantage broadcast to
every token. Each function returns the loss and two boolean masks: where the lower and the upper
clip bound is the active term (the clip fractions logged by trainers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Surrogate(NamedTuple):
    loss: Tensor  # (B, T) per-token loss
    clipped_low: Tensor  # (B, T) bool: the lower bound 1 - eps_low is active
    clipped_high: Tensor  # (B, T) bool: the upper bound 1 + eps_high is active


def token_log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """``log r_t = logp_t - old_logp_t``, shape ``(B, T)``."""
    return logp - old_logp


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    r"""GSPO's ``log s_i = (1/|o_i|) \sum_t m_t (logp_t - old_logp_t)``, broadcast to ``(B, T)``.

    The gradient reaches every real token of row i through the mean (a fully masked row gets 0).
    """
    length = mask.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    return ((logp - old_logp) * mask).sum(-1, keepdim=True).div(length).expand_as(logp)


def ppo_clip(
    ratio: Tensor,
    adv: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    delta: float | None = None,
) -> Surrogate:
    r"""PPO's clipped surrogate, ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``.

    ``delta`` (TRL's two-sided clip) first clamps the unclipped ``r`` at ``delta``; ``dual_clip``
    (verl's ``clip_ratio_c``) caps the loss of a negative advantage at ``-c A``.
    """
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    unclipped_ratio = ratio if delta is None else ratio.clamp(max=delta)
    loss = -torch.min(unclipped_ratio * adv, clipped_ratio * adv)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.min(loss, -dual_clip * adv), loss)
    clipped_low = (ratio < 1 - clip_low) & (adv < 0)
    clipped_high = (ratio > 1 + clip_high) & (adv > 0)
    return Surrogate(loss, clipped_low, clipped_high)


def cispo(ratio: Tensor, adv: Tensor, logp: Tensor, clip_low: float | None, cap: float) -> Surrogate:
    r"""CISPO (MiniMax-M1): ``-sg(clip(r, 1-eps_low, cap)) A logp``.

    Every token keeps a gradient; only its weight is clipped.
    """
    low = None if clip_low is None else 1 - clip_low
    weight = ratio.clamp(min=low, max=cap).detach()
    loss = -weight * adv * logp
    clipped_low = torch.zeros_like(ratio, dtype=torch.bool) if low is None else ratio < low
    return Surrogate(loss, clipped_low, ratio > cap)


def sapo(ratio: Tensor, adv: Tensor, tau_pos: float, tau_neg: float) -> Surrogate:
    r"""SAPO's soft gate, ``-(4/tau) sigmoid(tau (r - 1)) A`` with tau = tau_pos if A > 0 else tau_neg.

    Its gradient in r is ``4 sigma (1 - sigma) A``: equal to the unclipped PPO gradient at r = 1 and
    decaying smoothly away from it, instead of a hard cut.
    """
    tau = torch.where(adv > 0, ratio.new_tensor(tau_pos), ratio.new_tensor(tau_neg))
    loss = -(torch.sigmoid(tau * (ratio - 1)) * (4 / tau)) * adv
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return Surrogate(loss, never, never)
