"""The specified function (docs/specification.md), exactly, and the Dr. GRPO paper's objective beside it.

Both take one group of G completions with *sequence-level* log-probs (one number per completion)
and return the negated objective as a Python float, in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def dr_grpo_objective(
    log_probs: ArrayLike,
    log_probs_old: ArrayLike,
    ref_log_probs: ArrayLike,
    rewards: ArrayLike,
    epsilon: float = 0.2,
    beta: float = 0.04,
) -> float:
    r"""The specification's objective for one group of G completions, as a loss (float64, numpy).

    .. math::
        A_i = \frac{r_i - \mathrm{mean}(r)}{\mathrm{std}(r)} \;(\text{population std; all } A_i = 0
              \text{ if std} < 10^{-8}), \qquad \rho_i = e^{\log\pi_i - \log\pi^{old}_i}

        \text{loss} = -\Big(\tfrac1G\sum_i \min(\rho_i A_i,\ \mathrm{clip}(\rho_i, 1-\epsilon, 1+\epsilon) A_i)
                      - \beta\,\tfrac1G\sum_i (\log\pi_i - \log\pi^{ref}_i)\Big)

    This is the specification exactly (same operations in the same order, float64), including
    two choices the Dr. GRPO paper (Liu et al. 2025, arXiv 2503.20783) does *not* make: it
    divides the advantage by the group std (the paper removes it, "Modification 2") and it uses
    a k1 KL penalty with beta = 0.04 (the paper uses beta = 0). With sequence-level inputs the
    paper's other change, a constant length normaliser, does not arise. For the paper's
    objective see :func:`dr_grpo_paper_objective`, and for the token-level loss
    ``drgrpo.policy_loss`` with ``LossConfig.preset("dr_grpo", max_completion_length=L)``;
    ``LossConfig.preset("seed")`` reproduces this function with one token per completion.

    Args:
        log_probs, log_probs_old, ref_log_probs, rewards: 1-D, length G (lists or arrays).
        epsilon: clip range (>= 0). beta: KL coefficient (>= 0).
    """
    lp, lp_old, lp_ref, r = _group_inputs(log_probs, log_probs_old, ref_log_probs, rewards, epsilon, beta)
    group_size = len(r)

    # Group-relative advantages, scaled by the population std (the specification's choice).
    mean_r = np.mean(r)
    std_r = np.std(r)
    if std_r < 1e-8:
        advantages = np.zeros(group_size)
    else:
        advantages = (r - mean_r) / std_r

    ratio = np.exp(lp - lp_old)
    unclipped = ratio * advantages
    clipped = np.clip(ratio, 1 - epsilon, 1 + epsilon) * advantages
    surrogate = np.minimum(unclipped, clipped)
    kl = lp - lp_ref  # k1 estimator of KL(pi_theta || pi_ref)
    objective = np.mean(surrogate) - beta * np.mean(kl)
    return float(-objective)


def dr_grpo_paper_objective(
    log_probs: ArrayLike,
    log_probs_old: ArrayLike,
    ref_log_probs: ArrayLike,
    rewards: ArrayLike,
    epsilon: float = 0.2,
    beta: float = 0.0,
) -> float:
    r"""The Dr. GRPO paper's objective for one group with sequence-level log-probs, as a loss.

    Identical to :func:`dr_grpo_objective` except ``A_i = r_i - mean(r)`` (no std division,
    Liu et al. 2025, arXiv 2503.20783) and the paper's default ``beta = 0``.
    """
    lp, lp_old, lp_ref, r = _group_inputs(log_probs, log_probs_old, ref_log_probs, rewards, epsilon, beta)
    advantages = r - np.mean(r)  # Modification 2: no std division
    ratio = np.exp(lp - lp_old)
    surrogate = np.minimum(ratio * advantages, np.clip(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    objective = np.mean(surrogate) - beta * np.mean(lp - lp_ref)
    return float(-objective)


def _group_inputs(
    log_probs: ArrayLike,
    log_probs_old: ArrayLike,
    ref_log_probs: ArrayLike,
    rewards: ArrayLike,
    epsilon: float,
    beta: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names = ("log_probs", "log_probs_old", "ref_log_probs", "rewards")
    arrays = []
    for name, value in zip(names, (log_probs, log_probs_old, ref_log_probs, rewards)):
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            raise TypeError(f"{name} must be a 1-D list or numpy array of numbers, got {type(value).__name__}")
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must hold numbers: {err}") from None
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D (G,), got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            first = int(np.flatnonzero(~np.isfinite(array))[0])
            raise ValueError(f"{name} has a non-finite value {array[first]} at position {first}")
        arrays.append(array)
    group_size = len(arrays[3])
    if group_size < 1:
        raise ValueError("rewards must hold at least one completion, got an empty group")
    for name, array in zip(names[:3], arrays[:3]):
        if len(array) != group_size:
            raise ValueError(f"{name} must have length G={group_size} (the number of rewards), got {len(array)}")
    for name, value in (("epsilon", epsilon), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return arrays[0], arrays[1], arrays[2], arrays[3]
