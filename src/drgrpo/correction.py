r"""The sampler-mismatch correction and the off-policy sequence mask, from the sampler's log-probs.

A fast sampler (vLLM) reports log-probs ``sampling_logp`` of the tokens it drew that differ from the
trainer's ``old_logp`` of the same weights (other kernels, bf16). With ``d_t = old_logp_t -
sampling_logp_t`` on real tokens (0 where the sampler could not score a token: NaN), the correction
weight is (TRL 1.16's ``vllm_importance_sampling_mode``)::

    token_*     rho_t = exp(d_t)                     one weight per token
    sequence_*  rho_t = exp(sum_{t'} d_{t'})         one weight per completion, on every token
    *_truncate  rho <- clamp(rho, clip_min, clip_max)
    *_mask      rho <- 0 where rho < clip_min or rho > clip_max

and each token's surrogate is multiplied by ``rho_t`` (data: no gradient). The off-policy sequence
mask (DeepSeek-V3.2, arXiv 2512.02556, eq. 9) drops a completion with a negative advantage whose mean
``sampling_logp_t - logp_t`` over its tokens exceeds a threshold.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLING_CORRECTIONS: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""The modes of ``LossConfig.sampling_correction`` (TRL's ``vllm_importance_sampling_mode`` values)."""


def sampling_log_diff(old_logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> Tensor:
    """``d = (old_logp - sampling_logp) m`` ``(B, T)``: 0 on padding and where the sampler gave NaN.

    Infinite differences become the dtype's largest finite value of their sign (as ``torch.nan_to_num``).
    """
    d = (old_logp - sampling_logp.to(old_logp.dtype)).masked_fill(~mask.bool(), 0.0)
    return torch.nan_to_num(d, nan=0.0)


def sampling_weight(
    old_logp: Tensor,
    sampling_logp: Tensor,
    mask: Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> Tensor:
    """The correction weight ``rho`` ``(B, T)`` (the module docstring's table), detached; 1 on padding
    for token modes. A bound of ``None`` is no bound."""
    with torch.no_grad():
        d = sampling_log_diff(old_logp, sampling_logp, mask)
        if mode.startswith("sequence"):
            d = d.sum(-1, keepdim=True).expand_as(d)  # (B, T): the completion's sum on each token
        rho = torch.exp(d)
        if mode.endswith("truncate"):
            return rho.clamp(min=clip_min, max=clip_max)
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        return rho.masked_fill((rho < low) | (rho > high), 0.0)


def off_policy_keep(advantages: Tensor, logp: Tensor, sampling_logp: Tensor, mask: Tensor, threshold: float) -> Tensor:
    r"""DeepSeek-V3.2's off-policy sequence mask ``(B, 1)``: 1 keeps completion i, 0 drops it.

    Keep iff ``A_i >= 0`` or ``(1/|o_i|) sum_t m_t (sampling_logp_t - sg(logp_t)) <= threshold`` (NaN
    sampler log-probs count as 0; an empty row has mean 0).
    """
    with torch.no_grad():
        m = mask.to(logp.dtype)
        gap = torch.nan_to_num((sampling_logp.to(logp.dtype) - logp.detach()).masked_fill(~mask.bool(), 0.0), nan=0.0)
        mean = (gap * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
        keep = (advantages.reshape(-1, 1) >= 0) | (mean <= threshold)
        return keep.to(logp.dtype)


def sampling_metrics(
    old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, weight: Tensor | None, sequence: bool
) -> dict[str, Tensor]:
    """Detached: ``sampling_logp_difference_mean/max`` (``|old - sampling|`` over real tokens the sampler scored)
    and, with a correction ``weight``, ``importance_sampling_ratio_min/mean/max`` (over real tokens, or one value
    per completion for sequence modes). 0 when there is nothing to measure (TRL's convention)."""
    with torch.no_grad():
        real = mask.bool()
        gap = (old_logp - sampling_logp.to(old_logp.dtype)).abs()
        scored = real & ~torch.isnan(gap)
        gaps = gap[scored]
        zero = old_logp.new_zeros(())
        out = {
            "sampling_logp_difference_mean": gaps.mean() if gaps.numel() else zero,
            "sampling_logp_difference_max": gaps.max() if gaps.numel() else zero,
        }
        if weight is not None:
            values = weight[:, 0] if sequence else weight[real]
            if values.numel():
                out.update(
                    importance_sampling_ratio_min=values.min(),
                    importance_sampling_ratio_mean=values.mean(),
                    importance_sampling_ratio_max=values.max(),
                )
            else:
                out.update({f"importance_sampling_ratio_{k}": zero for k in ("min", "mean", "max")})
        return out
