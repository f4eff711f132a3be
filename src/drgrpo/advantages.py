"""Group-relative advantages: ``A_i = (r_i - mean_group(r)) / (std + eps)``, or without the std (Dr. GRPO).

Rewards ``(N,)`` come in contiguous groups of ``G`` completions (one prompt per group).
The Dr. GRPO paper (arXiv 2503.20783) removes the std division ("Modification 2"): dividing by
a group's std up-weights prompts that are nearly always or never solved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from drgrpo.config import LossConfig
from drgrpo.field_error import FieldError
from drgrpo.validation import check_finite


def group_advantages(
    rewards: Tensor | Sequence[float], group_size: int, config: LossConfig, *, batch_std: Tensor | None = None
) -> Tensor:
    r"""Advantages ``(N,)`` from rewards ``(N,)`` in contiguous groups of ``group_size``.

    .. math::
        A_i = \frac{r_i - \bar r_{g(i)}}{\sigma + \epsilon}, \qquad
        \sigma = \begin{cases} \mathrm{std}_{g(i)}(r) & \texttt{advantage\_std="group"} \\
                                \mathrm{std}_{\text{batch}}(r) & \texttt{"batch"} \\
                                \text{(no division)} & \texttt{"none"} \end{cases}

    The std uses ddof=1 when ``config.std_unbiased`` (ddof=0 otherwise); a group with no spread
    (std + eps == 0, or std below ``config.std_zero_threshold``) gets advantage 0. With
    ``config.nan_rewards == "ignore"`` NaN rewards are left out of mean and std and get advantage 0.

    Args:
        rewards: ``(N,)`` floating tensor (or a sequence of floats); integers are promoted to the default dtype.
        group_size: G >= 1, with N a multiple of G.
        config: the advantage fields of a :class:`~drgrpo.config.LossConfig`.
        batch_std: for ``advantage_std="batch"``, a precomputed (0-dim) batch std to use instead of
            this batch's own, e.g. the std over all processes (see :func:`drgrpo.distributed.global_group_advantages`).

    Returns:
        ``(N,)`` tensor, same dtype and device as ``rewards`` (floating).
    """
    r = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(r.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = r.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"the number of rewards N={n} must be a multiple of group_size={group_size} "
            "(completions come in contiguous groups, one prompt per group)"
        )
    nan = torch.isnan(r)
    if config.nan_rewards == "error":
        check_finite("rewards", r)
    elif bool(torch.isinf(r).any()):
        check_finite("rewards", torch.where(nan, torch.zeros_like(r), r))

    grouped = r.view(-1, group_size)  # (N/G, G)
    valid = ~nan.view(-1, group_size)  # (N/G, G)
    mean = _masked_mean(grouped, valid, dim=1)  # (N/G, 1)
    centered = grouped - mean  # (N/G, G)

    if config.advantage_std == "none":
        advantages = centered
    else:
        ddof = 1 if config.std_unbiased else 0
        if config.advantage_std == "group":
            std = _masked_std(grouped, valid, ddof, dim=1)  # (N/G, 1)
        else:
            std = _masked_std(r.view(1, -1), ~nan.view(1, -1), ddof, dim=1) if batch_std is None else batch_std.to(r)
            std = std.reshape(1, 1)  # (1, 1); batch_std: e.g. the global std across processes
        denom = std + config.std_eps
        advantages = torch.where(denom > 0, centered / denom.clamp_min(torch.finfo(r.dtype).tiny), 0.0)
        if config.std_zero_threshold is not None:
            advantages = torch.where(std < config.std_zero_threshold, 0.0, advantages)
    if group_size == 1 and config.singleton_advantage == "reward":
        # verl: a group of one gets mean 0 and std 1, so its advantage is the reward itself
        advantages = grouped if config.advantage_std == "none" else grouped / (1.0 + config.std_eps)
    advantages = torch.where(valid, advantages, 0.0)  # NaN rewards (only under "ignore") -> 0
    return advantages.reshape(n)


def _masked_mean(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Mean over the valid entries, shifted by their max: ``shift + mean(x - shift)``.

    Equal rewards then have exactly their common value as the mean (0.1 * 3 / 3 does not),
    so a group with no spread gets advantages of exactly 0 and an exactly zero gradient.
    """
    count = valid.sum(dim, keepdim=True)
    shift = torch.where(valid, x, -torch.inf).amax(dim, keepdim=True)
    shift = torch.where(count > 0, shift, 0.0)
    total = torch.where(valid, x - shift, 0.0).sum(dim, keepdim=True)
    return shift + total / count.clamp_min(1)


def _masked_std(x: Tensor, valid: Tensor, ddof: int, dim: int) -> Tensor:
    """Std over the valid entries; 0 where fewer than ``ddof + 1`` entries are valid."""
    count = valid.sum(dim, keepdim=True)
    deviation = torch.where(valid, x - _masked_mean(x, valid, dim), 0.0)
    var = (deviation * deviation).sum(dim, keepdim=True) / (count - ddof).clamp_min(1)
    return torch.where(count > ddof, var.sqrt(), 0.0)


OUTCOME_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_plus_plus_baseline", "opo", "grpo_passk", "gpg")
"""The outcome advantage estimators of :func:`outcome_advantages` (verl 0.9.1's of the same names)."""

WHITEN_EPS = 1e-8
"""Added to the variance before its square root in ``reinforce_plus_plus_baseline``'s whitening (verl's)."""


def outcome_advantages(
    rewards: Tensor | Sequence[float],
    group_size: int,
    config: LossConfig,
    estimator: str = "grpo",
    *,
    lengths: Tensor | Sequence[int] | None = None,
) -> Tensor:
    r"""Advantages ``(N,)`` from rewards ``(N,)`` in contiguous groups of ``group_size`` G, by ``estimator``.

    With ``m_g`` the mean of group g, ``n_i`` completion i's token count (``lengths``) and a group of one
    having ``m_g = 0``:

    ============================  ==================================================================================
    ``grpo``                      :func:`group_advantages` (the config's std, eps, singleton and NaN rules)
    ``rloo``                      ``G / (G - 1) (r_i - m_g)`` (leave-one-out baseline); ``r_i`` for G = 1
    ``opo``                       ``r_i - sum_g(n r) / sum_g(n)`` (length-weighted baseline); ``r_i`` for G = 1
    ``reinforce_plus_plus_baseline``  ``c_i = r_i - m_g``, whitened over the batch's tokens:
                                  ``(c_i - mu) / sqrt(var + 1e-8)``, ``mu`` and ``var`` (unbiased, over
                                  ``sum n`` tokens) weighting completion i by ``n_i``
    ``grpo_passk``                the best completion of each group gets ``r_max - r_second``, divided by
                                  ``std_g + config.std_eps`` when ``config.advantage_std == "group"``; others 0
    ``gpg``                       ``alpha (r_i - m_g)``, ``alpha = N / #{i: r_i != 0}`` (1 when every reward is 0)
    ============================  ==================================================================================

    Args:
        rewards: ``(N,)`` finite rewards (NaN only for ``grpo`` under ``nan_rewards="ignore"``).
        group_size: G >= 1 with N a multiple of G (``grpo_passk``: G >= 2).
        config: ``grpo`` reads every advantage field; ``grpo_passk`` reads ``advantage_std`` ("group" or
            "none"), ``std_unbiased`` and ``std_eps``; the others read none.
        estimator: one of :data:`OUTCOME_ESTIMATORS`.
        lengths: ``(N,)`` token counts, required by ``opo`` and ``reinforce_plus_plus_baseline``.

    Returns:
        ``(N,)`` tensor in the rewards' floating dtype.
    """
    if estimator not in OUTCOME_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(OUTCOME_ESTIMATORS)}; got {estimator!r}")
    if estimator == "grpo":
        return group_advantages(rewards, group_size, config)
    r = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    # the shape and group checks of group_advantages (its value is the plain centring, used below)
    centered = group_advantages(r, group_size, LossConfig(advantage_std="none"))  # (N,) r - m_g (0 for G = 1)
    check_finite("rewards", r)
    grouped = r.view(-1, group_size)  # (N/G, G)
    if group_size == 1:
        centered = r.clone()  # a group of one has mean 0: r - 0
    n = _lengths(lengths, r, estimator) if estimator in ("opo", "reinforce_plus_plus_baseline") else None

    if estimator == "rloo":
        return centered * (group_size / (group_size - 1)) if group_size > 1 else centered
    if estimator == "gpg":
        nonzero = int((r != 0).sum())
        return centered * (r.shape[0] / max(nonzero, 1))
    if estimator == "opo":
        assert n is not None
        if group_size == 1:
            return r.clone()
        weights = n.view(-1, group_size)
        total = weights.sum(1, keepdim=True)  # (N/G, 1)
        baseline = torch.where(total > 0, (weights * grouped).sum(1, keepdim=True) / total.clamp_min(1), 0.0)
        return (grouped - baseline).reshape(-1)
    if estimator == "reinforce_plus_plus_baseline":
        assert n is not None
        tokens = n.sum()
        if float(tokens) < 2:
            raise ValueError(
                f"reinforce_plus_plus_baseline whitens over the batch's tokens and needs at least 2, got {int(tokens)}"
            )
        mu = (n * centered).sum() / tokens
        var = (n * (centered - mu) ** 2).sum() / (tokens - 1)  # unbiased, token-weighted
        return (centered - mu) / torch.sqrt(var + WHITEN_EPS)
    # grpo_passk
    if group_size < 2:
        raise ValueError("grpo_passk compares each group's best two completions: group_size must be >= 2, got 1")
    if config.advantage_std == "batch":
        raise FieldError(
            LossConfig, "advantage_std", "grpo_passk divides by its group's std or by nothing: advantage_std 'batch'"
        )
    top, where = grouped.topk(2, dim=1)  # (N/G, 2)
    gap = top[:, 0] - top[:, 1]  # (N/G,)
    if config.advantage_std == "group":
        ddof = 1 if config.std_unbiased else 0
        std = _masked_std(grouped, torch.ones_like(grouped, dtype=torch.bool), ddof, dim=1).squeeze(1)
        gap = gap / (std + config.std_eps)
    out = torch.zeros_like(grouped).scatter(1, where[:, :1], gap.unsqueeze(1))
    return out.reshape(-1)


def _lengths(lengths: Tensor | Sequence[int] | None, r: Tensor, estimator: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"estimator {estimator!r} weights completions by their token counts: pass lengths (N,)")
    n = lengths if isinstance(lengths, Tensor) else torch.as_tensor(lengths)
    if n.shape != r.shape:
        raise ValueError(f"lengths must have the rewards' shape {tuple(r.shape)}, got {tuple(n.shape)}")
    if bool((n < 0).any()):
        raise ValueError(f"lengths must be >= 0, got {n.min().item()}")
    return n.to(r)
