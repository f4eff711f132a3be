"""A float64 numpy oracle for every formula in the library, written for clarity, not speed.

Plain loops over completions and tokens, scalar ``math`` where possible: no code is shared
with the PyTorch implementation, which the tests check against these functions. No public name here is
also a public name of ``drgrpo``: where it would be, it is ``oracle_<name>`` (``oracle_policy_loss`` is the
oracle of ``drgrpo.policy_loss``), so an import says which one it holds (docs/design.md, section 9.8).
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from drgrpo.registry import SURROGATES

if TYPE_CHECKING:
    from drgrpo.config import LossConfig


# --------------------------------------------------------------------------- advantages
def oracle_group_advantages(
    rewards: ArrayLike,
    group_size: int,
    *,
    std: str = "none",
    unbiased: bool = True,
    eps: float = 0.0,
    zero_threshold: float | None = None,
    nan_rewards: str = "error",
    singleton: str = "zero",
) -> np.ndarray:
    """``A_i = (r_i - mean_group) / (std + eps)`` (or no division), one group at a time.

    ``singleton="reward"`` (verl): a group of one has mean 0 and std 1, so ``A = r / (1 + eps)`` (``r`` without std).
    """
    r = np.asarray(rewards, dtype=np.float64)
    n = len(r)
    assert n % group_size == 0
    if nan_rewards == "error":
        assert not np.isnan(r).any()
    ddof = 1 if unbiased else 0

    def spread(values: list[float]) -> float:
        if len(values) <= ddof:
            return 0.0
        mu = sum(values) / len(values)
        return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - ddof))

    batch_std = spread([v for v in r if not math.isnan(v)])
    out = np.zeros(n)
    for start in range(0, n, group_size):
        group = [v for v in r[start : start + group_size] if not math.isnan(v)]
        mean = sum(group) / len(group) if group else 0.0
        s = spread(group) if std == "group" else batch_std
        for i in range(start, start + group_size):
            if math.isnan(r[i]):
                continue  # unscorable: advantage 0
            centered = r[i] - mean
            if group_size == 1 and singleton == "reward":
                out[i] = r[i] if std == "none" else r[i] / (1.0 + eps)
            elif std == "none":
                out[i] = centered
            elif (zero_threshold is not None and s < zero_threshold) or s + eps == 0:
                out[i] = 0.0
            else:
                out[i] = centered / (s + eps)
    return out


def config_advantages(rewards: ArrayLike, group_size: int, config: LossConfig) -> np.ndarray:
    """:func:`oracle_group_advantages` with the fields of a LossConfig."""
    return oracle_group_advantages(
        rewards,
        group_size,
        std=config.advantage_std,
        unbiased=config.std_unbiased,
        eps=config.std_eps,
        zero_threshold=config.std_zero_threshold,
        nan_rewards=config.nan_rewards,
        singleton=config.singleton_advantage,
    )


def oracle_outcome_advantages(
    rewards: ArrayLike,
    group_size: int,
    estimator: str,
    *,
    lengths: ArrayLike | None = None,
    std: str = "group",
    unbiased: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
    """verl's outcome estimators, one group at a time (``grpo`` is :func:`oracle_group_advantages`, not here).

    A group of one has mean 0. ``std``/``unbiased``/``eps`` are read by ``grpo_passk`` only.
    """
    r = [float(v) for v in np.asarray(rewards, dtype=np.float64)]
    n = len(r)
    assert n % group_size == 0
    tokens = [0.0] * n if lengths is None else [float(v) for v in np.asarray(lengths)]
    groups = [list(range(s, s + group_size)) for s in range(0, n, group_size)]

    def mean_of(members: list[int]) -> float:
        return sum(r[i] for i in members) / len(members) if len(members) > 1 else 0.0

    out = [0.0] * n
    if estimator == "rloo":
        for members in groups:
            g = len(members)
            for i in members:
                out[i] = (r[i] - mean_of(members)) * g / (g - 1) if g > 1 else r[i]
    elif estimator == "opo":
        for members in groups:
            weight = sum(tokens[i] for i in members)
            if len(members) == 1:
                baseline = 0.0
            elif weight > 0:
                baseline = sum(tokens[i] * r[i] for i in members) / weight
            else:
                baseline = mean_of(members)
            for i in members:
                out[i] = r[i] - baseline
    elif estimator == "gpg":
        alpha = n / max(sum(1 for v in r if v != 0), 1)
        for members in groups:
            for i in members:
                out[i] = alpha * (r[i] - mean_of(members))
    elif estimator == "reinforce_plus_plus_baseline":
        centered = [0.0] * n
        for members in groups:
            for i in members:
                centered[i] = r[i] - mean_of(members)
        total = sum(tokens)
        mu = sum(tokens[i] * centered[i] for i in range(n)) / total
        var = sum(tokens[i] * (centered[i] - mu) ** 2 for i in range(n)) / (total - 1)
        out = [(c - mu) / math.sqrt(var + 1e-8) for c in centered]
    elif estimator == "grpo_passk":
        for members in groups:
            assert len(members) >= 2
            ranked = sorted(members, key=lambda i: -r[i])
            gap = r[ranked[0]] - r[ranked[1]]
            if std == "group":
                mu = sum(r[i] for i in members) / len(members)
                ddof = 1 if unbiased else 0
                spread = math.sqrt(sum((r[i] - mu) ** 2 for i in members) / (len(members) - ddof))
                gap = gap / (spread + eps)
            out[ranked[0]] = gap
    else:
        raise ValueError(estimator)
    return np.array(out)


# --------------------------------------------------------------------------- per-token terms
def oracle_kl(logp: float, ref: float, kind: str) -> float:
    """One token's KL estimate; ``d = logp - ref``."""
    d = logp - ref
    if kind == "k1":
        return d
    if kind == "k2":
        return d * d / 2
    if kind == "k3":
        return math.exp(-d) + d - 1
    if kind == "low_var_kl":
        x = min(max(-d, -20.0), 20.0)
        return min(max(math.exp(x) - x - 1, -10.0), 10.0)
    if kind == "abs":
        return abs(d)
    raise ValueError(kind)


class OracleToken(NamedTuple):
    """One real token as a per-token oracle sees it (plain floats)."""

    ratio: float  # the importance ratio at the config's ratio level (s_i at sequence level)
    adv: float  # the completion's advantage
    logp: float  # log pi_theta of the token
    old_logp: float  # log pi_old of the token
    sampling_weight: float | None = None  # the sampler correction's weight rho (config.sampling_correction), if on


class OracleRow(NamedTuple):
    """One completion's real tokens, for a batch oracle (lists of equal length |o_i|)."""

    tokens: list[OracleToken]


def ppo_token_loss(t: OracleToken, config: LossConfig) -> float:
    """``-min(r A, clip(r) A)``, with TRL's two-sided ``delta`` and verl's dual clip."""
    assert config.clip_low is not None
    clipped = min(max(t.ratio, 1 - config.clip_low), 1 + config.clip_high)
    unclipped = t.ratio if config.delta is None else min(t.ratio, config.delta)
    loss = -min(unclipped * t.adv, clipped * t.adv)
    if config.dual_clip is not None and t.adv < 0:
        loss = min(loss, -config.dual_clip * t.adv)
    return loss


def cispo_token_loss(t: OracleToken, config: LossConfig) -> float:
    """``-sg(clip(r, 1 - eps_low, cap)) A logp`` (the value; the weight carries no gradient)."""
    cap = config.cispo_cap if config.cispo_cap is not None else 1 + config.clip_high
    weight = min(t.ratio, cap)
    if config.clip_low is not None:
        weight = max(weight, 1 - config.clip_low)
    return -weight * t.adv * t.logp


def sapo_token_loss(t: OracleToken, config: LossConfig) -> float:
    """``-(4/tau) sigmoid(tau (r - 1)) A``."""
    tau = config.sapo_tau_pos if t.adv > 0 else config.sapo_tau_neg
    return -(4 / tau) / (1 + math.exp(-tau * (t.ratio - 1))) * t.adv


def gpg_token_loss(t: OracleToken, config: LossConfig) -> float:
    """``-A logp``."""
    return -t.adv * t.logp


def dro_token_loss(t: OracleToken, config: LossConfig) -> float:
    """``-(A logp - beta/2 (logp - old)^2)``."""
    assert config.dro_beta is not None
    d = t.logp - t.old_logp
    return -(t.adv * t.logp - 0.5 * config.dro_beta * d * d)


def _dppo_token_loss(t: OracleToken, config: LossConfig, inside: bool) -> float:
    ratio = t.ratio  # at the config's ratio level (verl's dppo: per token)
    weight = ratio if config.dppo_cap is None else min(ratio, config.dppo_cap)
    return -t.adv * weight * t.logp if inside else 0.0


def dppo_tv_token_loss(t: OracleToken, config: LossConfig) -> float:
    """DPPO-TV: ``-A min(r, c) logp`` where ``p - p_old <= eps_high`` (A > 0) or ``>= -eps_low`` (A <= 0), else 0."""
    gap = math.exp(t.logp) - math.exp(t.old_logp)
    low = config.clip_low if config.clip_low is not None else 0.0
    inside = gap <= config.clip_high if t.adv > 0 else gap >= -low
    return _dppo_token_loss(t, config, inside)


def dppo_kl_token_loss(t: OracleToken, config: LossConfig) -> float:
    """DPPO-KL: as DPPO-TV with the binary KL between p_old and p as the trust region."""
    p, p_old = math.exp(t.logp), math.exp(t.old_logp)
    odds = (1 - p_old + 1e-8) / (1 - p + 1e-8)  # <= 0 only for log-probs above 0: NaN, outside every bound
    binary_kl = p_old * (t.old_logp - t.logp) + (1 - p_old) * (math.log(odds) if odds > 0 else math.nan)
    low = config.clip_low if config.clip_low is not None else 0.0
    if t.adv > 0:
        inside = binary_kl <= config.clip_high or p <= p_old
    else:
        inside = binary_kl <= low or p >= p_old
    return _dppo_token_loss(t, config, inside)


def geo_mean_losses(rows: list[OracleRow], config: LossConfig) -> list[list[float]]:
    """GMPO: ``-A exp(mean_t clipped d_t)`` on every token of the row, ``d_t`` clipped to ``[-eps_low, eps_high]``
    where that is the smaller of ``A d_t`` and ``A clip(d_t)``."""
    low = config.clip_low if config.clip_low is not None else 0.0
    out = []
    for row in rows:
        kept = []
        for t in row.tokens:
            d = t.logp - t.old_logp
            c = min(max(d, -low), config.clip_high)
            if t.adv > 0:
                kept.append(min(d, c))
            elif t.adv < 0:
                kept.append(max(d, c))
            else:
                kept.append(0.0)
        rho = math.exp(math.fsum(kept) / len(kept)) if kept else 1.0
        out.append([-t.adv * rho for t in row.tokens])
    return out


def _token_covariances(rows: list[OracleRow]) -> list[list[float]]:
    """``(A - mean A)(logp - mean logp)`` for every real token, means over all rows' real tokens."""
    tokens = [t for row in rows for t in row.tokens]
    if not tokens:
        return [[] for _ in rows]
    mean_adv = math.fsum(t.adv for t in tokens) / len(tokens)
    mean_logp = math.fsum(t.logp for t in tokens) / len(tokens)
    return [[(t.adv - mean_adv) * (t.logp - mean_logp) for t in row.tokens] for row in rows]


def kl_cov_losses(rows: list[OracleRow], config: LossConfig) -> list[list[float]]:
    """KL-Cov: ``-A r``, plus ``coef |logp - old|`` on the ``max(1, floor(ratio n))`` tokens of largest covariance."""
    cov = _token_covariances(rows)
    flat = [(cov[i][j], i, j) for i, row in enumerate(rows) for j in range(len(row.tokens))]
    k = max(1, int(len(flat) * config.kl_cov_ratio)) if flat else 0
    chosen = {(i, j) for _, i, j in sorted(flat, key=lambda c: -c[0])[:k]}
    out = []
    for i, row in enumerate(rows):
        losses = []
        for j, t in enumerate(row.tokens):
            loss = -t.adv * t.ratio
            if (i, j) in chosen:
                loss += config.ppo_kl_coef * abs(t.logp - t.old_logp)
            losses.append(loss)
        out.append(losses)
    return out


def clip_cov_losses(rows: list[OracleRow], config: LossConfig) -> list[list[float]]:
    """Clip-Cov: PPO's clipped loss, 0 on a random draw of the unclipped tokens with ``lb < cov < ub``.

    The draw is ``torch.randperm`` of the candidates (row-major), the generator verl uses: seed it the same.
    """
    import torch  # the random draw only

    cov = _token_covariances(rows)
    low = config.clip_low if config.clip_low is not None else 0.0
    loss, candidates = [], []
    n = sum(len(row.tokens) for row in rows)
    for i, row in enumerate(rows):
        losses = []
        for j, t in enumerate(row.tokens):
            unclipped, clipped = -t.adv * t.ratio, -t.adv * min(max(t.ratio, 1 - low), 1 + config.clip_high)
            losses.append(max(unclipped, clipped))
            if not clipped > unclipped and config.clip_cov_lb < cov[i][j] < config.clip_cov_ub:
                candidates.append((i, j))
        loss.append(losses)
    if candidates:
        k = max(int(config.clip_cov_ratio * n), 1)
        for c in torch.randperm(len(candidates))[:k].tolist():
            i, j = candidates[c]
            loss[i][j] = 0.0
    return loss


def vespo_phi(row: OracleRow, config: LossConfig) -> float:
    """VESPO's weight of one completion, ``phi(w) = exp(lambda + k log w - lambda w)`` with ``log w`` the clamped sum
    of the clamped token log-ratios and log sampler weights; 1 for a completion with no token (``w = 1``)."""
    if not row.tokens:
        return 1.0
    floor = math.log(1e-8)
    log_w = 0.0
    for t in row.tokens:
        log_w += min(max(t.logp - t.old_logp, -20.0), 20.0)
        if t.sampling_weight is not None:
            log_rho = math.log(t.sampling_weight) if t.sampling_weight > 0 else -math.inf
            log_w += min(max(log_rho, floor), 20.0)
    log_w = min(max(log_w, floor), 20.0)
    adv = row.tokens[0].adv
    k = config.vespo_k_pos if adv >= 0 else config.vespo_k_neg
    lam = max(config.vespo_lambda_pos if adv >= 0 else config.vespo_lambda_neg, 1e-4)
    try:
        return math.exp(lam + k * log_w - lam * math.exp(log_w))
    except OverflowError:
        return 0.0  # TRL: a non-finite weight is 0


def vespo_losses(rows: list[OracleRow], config: LossConfig) -> list[list[float]]:
    """VESPO: ``-phi(w) A logp`` on every token of a completion (:func:`vespo_phi`; phi carries no gradient)."""
    out: list[list[float]] = []
    for row in rows:
        phi = vespo_phi(row, config)
        out.append([-phi * t.adv * t.logp for t in row.tokens])
    return out


# --------------------------------------------------------------------------- the sampler's log-probs
def _finite_or_zero(x: float) -> float:
    """NaN -> 0, +-inf -> the largest float of that sign (torch.nan_to_num's rule, float64)."""
    if math.isnan(x):
        return 0.0
    if math.isinf(x):
        return math.copysign(sys.float_info.max, x)
    return x


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def sampling_weights(
    old_logp: list[float], sampling_logp: list[float], mode: str, clip_min: float | None, clip_max: float | None
) -> list[float]:
    """One completion's correction weights rho over its real tokens: d_t = old_t - sampling_t (0 where NaN), then
    exp(d_t) (token modes) or exp(sum_t d_t) on every token (sequence modes), clamped (truncate) or zeroed outside
    [clip_min, clip_max] (mask)."""
    d = [_finite_or_zero(o - s) for o, s in zip(old_logp, sampling_logp)]
    if mode.startswith("sequence"):
        total = 0.0
        for x in d:
            total += x  # plain float additions: an overflow is inf, as in torch
        rho = [_exp(total)] * len(d)
    else:
        rho = [_exp(x) for x in d]
    out = []
    for r in rho:
        if mode.endswith("truncate"):
            if clip_min is not None:
                r = max(r, clip_min)
            if clip_max is not None:
                r = min(r, clip_max)
        elif (clip_min is not None and r < clip_min) or (clip_max is not None and r > clip_max):
            r = 0.0
        out.append(r)
    return out


def oracle_off_policy_keep(adv: float, logp: list[float], sampling_logp: list[float], threshold: float) -> bool:
    """DeepSeek-V3.2's off-policy sequence mask: keep iff A >= 0 or mean_t (sampling_t - logp_t) <= threshold
    (NaN differences count as 0; an empty completion has mean 0)."""
    gaps = [_finite_or_zero(s - lp) for lp, s in zip(logp, sampling_logp)]
    mean = math.fsum(gaps) / len(gaps) if gaps else 0.0
    return adv >= 0 or mean <= threshold


# --------------------------------------------------------------------------- entropy
def quantile_threshold(values: list[float], quantile: float) -> float:
    """The ``1 - quantile`` quantile of ``values`` by linear interpolation between sorted values, on float32
    values and rounded to float32 (as TRL's torch.quantile on float32); +inf for no values."""
    if not values:
        return math.inf
    v = sorted(float(np.float32(x)) for x in values)
    pos = (1.0 - quantile) * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return float(np.float32(v[lo] + (pos - lo) * (v[hi] - v[lo])))


# --------------------------------------------------------------------------- aggregation
def aggregate(
    per_token: np.ndarray,
    mask: np.ndarray,
    aggregation: str,
    length: int | None = None,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> float:
    """One number from per-token losses ``(B, T)``; counts default to this batch's own."""
    b, t = per_token.shape
    real = [[mask[i][j] != 0 for j in range(t)] for i in range(b)]
    row_sums = [sum(per_token[i][j] for j in range(t) if real[i][j]) for i in range(b)]
    row_lengths = [sum(real[i]) for i in range(b)]
    if num_tokens is None:
        num_tokens = max(sum(row_lengths), 1)
    if num_sequences is None:
        num_sequences = b
    if aggregation == "token-mean":
        return sum(row_sums) / num_tokens
    if aggregation == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in zip(row_sums, row_lengths)) / num_sequences
    if aggregation == "seq-mean-token-sum-norm":
        assert length is not None
        return sum(row_sums) / (num_sequences * length)
    if aggregation == "seq-mean-token-sum":
        return sum(row_sums) / num_sequences
    if aggregation == "token-sum":
        return sum(row_sums)
    if aggregation == "token-sum-norm":  # verl <= 0.7's "seq-mean-token-sum-norm": L defaults to the padded width
        return sum(row_sums) / (length if length is not None else t)
    raise ValueError(aggregation)


# --------------------------------------------------------------------------- the whole loss
def oracle_rows(
    logp: ArrayLike,
    old_logp: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    config: LossConfig,
    sampling_logp: ArrayLike | None = None,
) -> tuple[list[list[int]], list[OracleRow]]:
    """Each completion's real token positions and its :class:`OracleRow` (ratios at the config's level, the sampler
    correction's weights where the config has one)."""
    lp = np.asarray(logp, dtype=np.float64)
    old = np.asarray(old_logp, dtype=np.float64)
    sampling = None if sampling_logp is None else np.asarray(sampling_logp, dtype=np.float64)
    adv = np.asarray(advantages, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    b, t = lp.shape
    positions: list[list[int]] = []
    rows: list[OracleRow] = []
    for i in range(b):
        tokens = [j for j in range(t) if m[i, j] != 0]
        if config.ratio_level == "sequence":
            seq_log_ratio = sum(lp[i, j] - old[i, j] for j in tokens) / max(len(tokens), 1)
        rho: list[float | None] = [None] * len(tokens)
        if config.sampling_correction is not None:
            assert sampling is not None
            olds, samples = [float(old[i, j]) for j in tokens], [float(sampling[i, j]) for j in tokens]
            rho = list(
                sampling_weights(
                    olds, samples, config.sampling_correction, config.sampling_clip_min, config.sampling_clip_max
                )
            )
        row = []
        for j, w in zip(tokens, rho):
            log_ratio = seq_log_ratio if config.ratio_level == "sequence" else lp[i, j] - old[i, j]
            row.append(OracleToken(math.exp(log_ratio), float(adv[i]), float(lp[i, j]), float(old[i, j]), w))
        positions.append(tokens)
        rows.append(OracleRow(row))
    return positions, rows


def per_token_losses(
    logp: ArrayLike,
    old_logp: ArrayLike | None,
    advantages: ArrayLike,
    mask: ArrayLike,
    config: LossConfig,
    ref_logp: ArrayLike | None = None,
    sampling_logp: ArrayLike | None = None,
    entropy_keep: np.ndarray | None = None,
) -> np.ndarray:
    """The per-token loss ``(B, T)`` (0 on padding): the surrogate, times the sampler correction's weight, the
    off-policy mask and the entropy mask (``entropy_keep``, 0/1) where the config has them, plus ``beta`` times the
    KL."""
    lp = np.asarray(logp, dtype=np.float64)
    old = lp if old_logp is None else np.asarray(old_logp, dtype=np.float64)
    sampling = None if sampling_logp is None else np.asarray(sampling_logp, dtype=np.float64)
    ref = None if ref_logp is None else np.asarray(ref_logp, dtype=np.float64)
    adv = np.asarray(advantages, dtype=np.float64)
    b, t = lp.shape
    out = np.zeros((b, t))
    member = SURROGATES.get(config.surrogate)
    positions, rows = oracle_rows(lp, old, adv, mask, config, sampling)
    if member.batch_oracle is not None:
        losses = member.batch_oracle(rows, config)
    else:
        assert member.oracle is not None
        losses = [[member.oracle(token, config) for token in row.tokens] for row in rows]
    for i in range(b):
        keep = True
        if config.off_policy_mask_threshold is not None:
            source = old if sampling is None else sampling  # the sampler's log-probs when there are any
            keep = oracle_off_policy_keep(
                float(adv[i]),
                [float(lp[i, j]) for j in positions[i]],
                [float(source[i, j]) for j in positions[i]],
                config.off_policy_mask_threshold,
            )
        for j, token, loss in zip(positions[i], rows[i].tokens, losses[i]):
            if token.sampling_weight is not None and not member.folds_sampling_weight:
                loss *= token.sampling_weight
            if not keep or (entropy_keep is not None and not entropy_keep[i, j]):
                loss = 0.0
            if config.beta != 0:
                assert ref is not None
                weight = token.ratio if config.kl_importance_weight else 1.0  # TRL's use_bias_correction_kl
                loss += config.beta * weight * oracle_kl(lp[i, j], ref[i, j], config.kl)
            out[i, j] = loss
    return out


def oracle_policy_loss(
    logp: ArrayLike,
    old_logp: ArrayLike | None,
    advantages: ArrayLike,
    mask: ArrayLike,
    config: LossConfig,
    ref_logp: ArrayLike | None = None,
    *,
    sampling_logp: ArrayLike | None = None,
    entropy: ArrayLike | None = None,
    entropy_threshold: float | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> float:
    """The aggregated loss of one batch, float64, minus the entropy bonus where the config has one (its token count:
    ``num_tokens`` when given, else the tokens it acts on)."""
    m = np.asarray(mask, dtype=np.float64)
    b, t = m.shape
    keep = None
    if config.top_entropy_quantile < 1 or config.entropy_coef != 0:
        assert entropy is not None
        h = np.asarray(entropy, dtype=np.float64)
        real = [(i, j) for i in range(b) for j in range(t) if m[i, j] != 0]
        keep = np.zeros((b, t))
        tau = entropy_threshold
        if config.top_entropy_quantile < 1 and tau is None:
            tau = quantile_threshold([h[i, j] for i, j in real], config.top_entropy_quantile)
        for i, j in real:
            keep[i, j] = 1.0 if config.top_entropy_quantile >= 1 or h[i, j] >= tau else 0.0
    per_token = per_token_losses(
        logp,
        old_logp,
        advantages,
        mask,
        config,
        ref_logp,
        sampling_logp,
        keep if config.top_entropy_quantile < 1 else None,
    )
    bonus = 0.0
    if config.entropy_coef != 0:
        assert keep is not None
        acting = [(i, j) for i in range(b) for j in range(t) if keep[i, j]]
        count = num_tokens if num_tokens is not None else max(len(acting), 1)
        bonus = config.entropy_coef * math.fsum(h[i, j] for i, j in acting) / count
    return -bonus + aggregate(
        per_token,
        np.asarray(mask),
        config.effective_aggregation,
        config.max_completion_length,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
    )
