"""Per-token estimators of KL(pi_theta || pi_ref) from sampled tokens (Schulman, "Approximating KL divergence").

With ``d = logp - ref_logp`` (log pi_theta - log pi_ref at the sampled token):

- k1 = d                                  unbiased, high variance, can be negative
- k2 = d^2 / 2                            biased, low variance
- k3 = exp(-d) + d - 1                    unbiased, non-negative (DeepSeekMath's choice)
- low_var_kl = clamp(k3 with d clamped to [-20, 20], -10, 10)     (verl)
- abs = |d|
"""

from __future__ import annotations

import torch
from torch import Tensor

from drgrpo.config import KL_KINDS, KLKind


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind) -> Tensor:
    """Per-token KL estimate, same shape as ``logp`` (e.g. ``(B, T)``); differentiable in ``logp``.

    Args:
        logp: log pi_theta of the sampled tokens.
        ref_logp: log pi_ref of the same tokens, same shape (no gradient is expected through it).
        kind: ``"k1" | "k2" | "k3" | "low_var_kl" | "abs"``.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) + d - 1
    if kind == "low_var_kl":
        neg = torch.clamp(-d, min=-20.0, max=20.0)  # log(pi_ref / pi_theta), clamped
        return torch.clamp(torch.exp(neg) - neg - 1, min=-10.0, max=10.0)
    if kind == "abs":
        return d.abs()
    raise ValueError(f"kind must be one of {', '.join(map(repr, KL_KINDS))}; got {kind!r}")
