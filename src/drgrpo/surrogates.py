"""Per-token policy-gradient surrogates (negated, to minimise), as pure functions of ``(B, T)`` tensors.

``ratio`` is the importance ratio pi_theta / pi_old per token (token level) or the same value
s_i for every token of completion i (sequence level, GSPO), ``adv`` the advantage broadcast to
every token. Each function returns the loss and two boolean masks: where the lower and the upper
clip bound is the active term (the clip fractions logged by trainers).

Each surrogate is registered with :func:`register_surrogate` (its float64 oracle, the LossConfig fields
it reads, its formula and paper); ``LossConfig.surrogate`` accepts the registered names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from drgrpo import reference
from drgrpo.field_error import FieldError
from drgrpo.registry import SURROGATES, SurrogateMember

if TYPE_CHECKING:
    from drgrpo.config import LossConfig


class Surrogate(NamedTuple):
    loss: Tensor  # (B, T) per-token loss
    clipped_low: Tensor  # (B, T) bool: the lower bound 1 - eps_low is active
    clipped_high: Tensor  # (B, T) bool: the upper bound 1 + eps_high is active
    weight: Tensor | None = None  # (B, 1) a member's own per-completion weight, reported as a metric (VESPO's phi)


class SurrogateInputs(NamedTuple):
    """What a surrogate reads, in the compute dtype, 0 on padding."""

    ratio: Tensor  # (B, T) importance ratio (s_i on every token of row i at sequence level)
    adv: Tensor  # (B, 1) advantage of each completion
    logp: Tensor  # (B, T) log pi_theta (carries the gradient)
    old_logp: Tensor  # (B, T) log pi_old (no gradient)
    mask: Tensor  # (B, T) 1.0 on real tokens
    sampling_weight: Tensor | None = None  # (B, T) the sampler correction's weight rho (no gradient), if on


SurrogateFn = Callable[[SurrogateInputs, "LossConfig"], Surrogate]


def register_surrogate(
    name: str,
    *,
    oracle: Callable[..., float] | None = None,
    batch_oracle: Callable[..., list[list[float]]] | None = None,
    fields: tuple[str, ...] = (),
    formula: str,
    paper: str,
    frameworks: str = "",
    peer_fields: Mapping[str, Mapping[str, str]] | None = None,
    folds_sampling_weight: bool = False,
    whole_rows: bool = False,
    check: Callable[[LossConfig], None] | None = None,
) -> Callable[[SurrogateFn], SurrogateFn]:
    """Decorator registering ``fn(x: SurrogateInputs, config: LossConfig) -> Surrogate`` under ``name``.

    Args:
        name: the value of ``LossConfig.surrogate`` that selects it (a taken name is a ValueError).
        oracle: its float64 value for one token, ``oracle(token: reference.OracleToken, config) -> float``,
            written with plain floats in :mod:`drgrpo.reference`; or
        batch_oracle: ``batch_oracle(rows: list[reference.OracleRow], config) -> list[list[float]]`` for a
            member whose token loss depends on other tokens (exactly one of the two).
        fields: the LossConfig fields it reads.
        formula, paper, frameworks: its row of docs/losses.md's table.
        peer_fields: per peer framework (``"trl"``, ``"verl"``), the peer's setting -> LossConfig field.
        folds_sampling_weight: the member uses ``x.sampling_weight`` itself (the loss does not multiply by it).
        whole_rows: a token's loss depends on other tokens of its completion (the fused path keeps rows whole).
        check: ``check(config)`` raises a FieldError for values of its fields it cannot take.
    """
    if (oracle is None) == (batch_oracle is None):
        raise TypeError(f"surrogate {name!r}: pass exactly one of oracle and batch_oracle")

    def decorator(fn: SurrogateFn) -> SurrogateFn:
        member = SurrogateMember(
            name,
            fn,
            oracle,
            batch_oracle,
            tuple(fields),
            formula,
            paper,
            frameworks,
            dict(peer_fields or {}),
            folds_sampling_weight,
            whole_rows,
            check,
        )
        SURROGATES.add(name, member)
        return fn

    return decorator


def get_surrogate(name: str) -> SurrogateMember:
    """The registered member ``name``; a ValueError listing the valid names otherwise."""
    return SURROGATES.get(name)


def surrogate_names() -> tuple[str, ...]:
    """The registered surrogates' names, in registration order."""
    return SURROGATES.names()


def surrogate_table() -> str:
    """docs/losses.md's table of the surrogates, one row per registered member (a test checks the page)."""
    lines = ["| surrogate | per-token loss | fields | paper | frameworks |", "|---|---|---|---|---|"]
    for m in SURROGATES:
        fields = ", ".join(f"`{f}`" for f in m.fields) or "none"
        lines.append(f"| `{m.name}` | `{m.formula}` | {fields} | {m.paper} | {m.frameworks} |")
    return "\n".join(lines)


def token_log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """``log r_t = logp_t - old_logp_t``, shape ``(B, T)``."""
    return logp - old_logp


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    r"""GSPO's ``log s_i = (1/|o_i|) \sum_t m_t (logp_t - old_logp_t)``, broadcast to ``(B, T)``.

    The gradient reaches every real token of row i through the mean (a fully masked row gets 0).
    """
    length = mask.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    return ((logp - old_logp) * mask).sum(-1, keepdim=True).div(length).expand_as(logp)


def cispo_cap(config: LossConfig) -> float:
    """The cap of CISPO's weight: ``cispo_cap``, or ``1 + clip_high`` when unset."""
    return config.cispo_cap if config.cispo_cap is not None else 1 + config.clip_high


# --------------------------------------------------------------------------- the members


@register_surrogate(
    "ppo",
    oracle=reference.ppo_token_loss,
    fields=("clip_low", "clip_high", "dual_clip", "delta"),
    formula="-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)",
    paper="Schulman et al. 2017 (arXiv 1707.06347)",
    frameworks="TRL grpo, dapo, dr_grpo, bnpo; verl vanilla, gspo",
    peer_fields={
        "trl": {"epsilon": "clip_low", "epsilon_high": "clip_high", "delta": "delta"},
        "verl": {"clip_ratio_c": "dual_clip"},
    },
)
def ppo_clip(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""PPO's clipped surrogate, ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``.

    ``delta`` (TRL's two-sided clip) first clamps the unclipped ``r`` at ``delta``; ``dual_clip``
    (verl's ``clip_ratio_c``) caps the loss of a negative advantage at ``-c A``.
    """
    ratio, adv = x.ratio, x.adv
    assert config.clip_low is not None  # LossConfig enforces it for "ppo"
    clip_low, clip_high = config.clip_low, config.clip_high
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    unclipped_ratio = ratio if config.delta is None else ratio.clamp(max=config.delta)
    loss = -torch.min(unclipped_ratio * adv, clipped_ratio * adv)
    if config.dual_clip is not None:
        loss = torch.where(adv < 0, torch.min(loss, -config.dual_clip * adv), loss)
    clipped_low = (ratio < 1 - clip_low) & (adv < 0)
    clipped_high = (ratio > 1 + clip_high) & (adv > 0)
    return Surrogate(loss, clipped_low, clipped_high)


@register_surrogate(
    "cispo",
    oracle=reference.cispo_token_loss,
    fields=("clip_low", "clip_high", "cispo_cap"),
    formula="-sg(clip(r, 1 - eps_low, cap)) A logp",
    paper="MiniMax-M1, MiniMax 2025 (arXiv 2506.13585)",
    frameworks="TRL cispo; verl cispo",
    peer_fields={"trl": {"epsilon_high": "cispo_cap"}},
)
def cispo(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""CISPO (MiniMax-M1, arXiv 2506.13585): ``-sg(clip(r, 1-eps_low, cap)) A logp``.

    Every token keeps a gradient; only its weight is clipped (``cap``: :func:`cispo_cap`; no lower bound
    when ``clip_low`` is none).
    """
    ratio, cap = x.ratio, cispo_cap(config)
    low = None if config.clip_low is None else 1 - config.clip_low
    weight = ratio.clamp(min=low, max=cap).detach()
    loss = -weight * x.adv * x.logp
    clipped_low = torch.zeros_like(ratio, dtype=torch.bool) if low is None else ratio < low
    return Surrogate(loss, clipped_low, ratio > cap)


@register_surrogate(
    "sapo",
    oracle=reference.sapo_token_loss,
    fields=("sapo_tau_pos", "sapo_tau_neg"),
    formula="-(4 / tau) sigmoid(tau (r - 1)) A, tau = tau_pos if A > 0 else tau_neg",
    paper="Soft Adaptive Policy Optimization, 2025 (arXiv 2511.20347)",
    frameworks="TRL sapo; verl sapo",
    peer_fields={
        "trl": {"sapo_temperature_pos": "sapo_tau_pos", "sapo_temperature_neg": "sapo_tau_neg"},
        "verl": {"tau_pos": "sapo_tau_pos", "tau_neg": "sapo_tau_neg"},
    },
)
def sapo(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""SAPO's soft gate (arXiv 2511.20347), ``-(4/tau) sigmoid(tau (r - 1)) A`` with tau = tau_pos if A > 0
    else tau_neg.

    Its gradient in r is ``4 sigma (1 - sigma) A``: equal to the unclipped PPO gradient at r = 1 and
    decaying smoothly away from it, instead of a hard cut.
    """
    ratio, adv = x.ratio, x.adv
    tau = torch.where(adv > 0, ratio.new_tensor(config.sapo_tau_pos), ratio.new_tensor(config.sapo_tau_neg))
    loss = -(torch.sigmoid(tau * (ratio - 1)) * (4 / tau)) * adv
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return Surrogate(loss, never, never)


# --------------------------------------------------------------------------- verl 0.9.1's other loss modes


@register_surrogate(
    "gpg",
    oracle=reference.gpg_token_loss,
    formula="-A logp",
    paper="GPG, Chu et al. 2025 (arXiv 2504.02546)",
    frameworks="verl gpg",
)
def gpg(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""GPG's plain policy gradient, ``-A logp``: no ratio and no clip (the gradient is ``-A`` per token)."""
    never = torch.zeros_like(x.ratio, dtype=torch.bool)
    return Surrogate(-x.adv * x.logp, never, never)


@register_surrogate(
    "dro",
    oracle=reference.dro_token_loss,
    fields=("dro_beta",),
    formula="-(A logp - dro_beta / 2 (logp - old_logp)^2)",
    paper="Direct Reward Optimisation, Richemond et al. 2024 (arXiv 2405.19107)",
    frameworks="verl dro",
    peer_fields={"verl": {"policy_loss.dro_beta": "dro_beta"}},
)
def dro(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""DRO's regularised policy gradient, ``-(A logp - (beta / 2) (logp - old_logp)^2)``, beta = ``dro_beta``."""
    beta = _required(config, "dro_beta")
    log_ratio = x.logp - x.old_logp
    never = torch.zeros_like(x.ratio, dtype=torch.bool)
    return Surrogate(-(x.adv * x.logp - 0.5 * beta * log_ratio * log_ratio), never, never)


def _dppo(x: SurrogateInputs, config: LossConfig, inside: Tensor) -> Surrogate:
    """DPPO's loss ``-A sg(min(r, c)) logp`` on the tokens ``inside`` the trust region, 0 elsewhere."""
    weight = x.ratio if config.dppo_cap is None else x.ratio.clamp(max=config.dppo_cap)
    loss = -x.adv * weight.detach() * x.logp * inside.detach().to(x.logp.dtype)
    positive = (x.adv > 0).expand_as(inside)
    return Surrogate(loss, ~inside & ~positive, ~inside & positive)


@register_surrogate(
    "dppo_tv",
    oracle=reference.dppo_tv_token_loss,
    fields=("clip_low", "clip_high", "dppo_cap"),
    formula="-A sg(min(r, c)) logp on tokens with p - p_old <= eps_high (A > 0) or >= -eps_low (A <= 0)",
    paper="DPPO, 2026 (arXiv 2602.04879), binary total variation",
    frameworks="verl dppo_tv",
    peer_fields={"verl": {"clip_ratio_c": "dppo_cap"}},
)
def dppo_tv(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""DPPO-Binary-TV: the truncated-IS policy gradient ``-A sg(min(r, c)) logp`` (c = ``dppo_cap``), kept on a
    token only while the probability moved by at most ``clip_high`` up (A > 0) or ``clip_low`` down (A <= 0)."""
    gap = x.logp.exp() - x.old_logp.exp()  # p - p_old
    inside = torch.where(x.adv > 0, gap <= config.clip_high, gap >= -config.epsilon_low)
    return _dppo(x, config, inside)


@register_surrogate(
    "dppo_kl",
    oracle=reference.dppo_kl_token_loss,
    fields=("clip_low", "clip_high", "dppo_cap"),
    formula="-A sg(min(r, c)) logp on tokens whose binary KL(p_old, p) <= eps (or that moved against A)",
    paper="DPPO, 2026 (arXiv 2602.04879), binary KL",
    frameworks="verl dppo_kl",
    peer_fields={"verl": {"clip_ratio_c": "dppo_cap"}},
)
def dppo_kl(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""DPPO-Binary-KL: as :func:`dppo_tv` with the trust region ``KL_bin(p_old || p) <= eps``, where
    ``KL_bin = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))``; a token whose
    probability moved against its advantage's direction is always kept."""
    p, p_old = x.logp.exp(), x.old_logp.exp()
    binary_kl = p_old * (x.old_logp - x.logp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
    up = torch.where(x.adv > 0, binary_kl <= config.clip_high, binary_kl <= config.epsilon_low)
    inside = up | torch.where(x.adv > 0, p <= p_old, p >= p_old)
    return _dppo(x, config, inside)


@register_surrogate(
    "geo_mean",
    batch_oracle=reference.geo_mean_losses,
    fields=("clip_low", "clip_high"),
    whole_rows=True,
    formula="-A exp(mean_t sgn(A) min(sgn(A) d_t, sgn(A) clip(d_t, -eps_low, eps_high))), d = logp - old_logp",
    paper="GMPO, Zhao et al. 2025 (arXiv 2507.20673)",
    frameworks="verl geo_mean",
)
def geo_mean(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""GMPO's geometric-mean ratio: ``-A_i rho_i`` on every token of completion i, with ``log rho_i`` the mean over
    its tokens of the log-ratio ``d_t`` clipped to ``[-eps_low, eps_high]`` only where the clip lowers ``A d_t``.

    A per-completion loss: aggregated with ``seq-mean-token-mean`` it is ``mean_i(-A_i rho_i)``. Reads its own
    token log-ratios (``ratio_level`` does not apply).
    """
    d = x.logp - x.old_logp  # (B, T)
    sign = torch.sign(x.adv)  # (B, 1)
    clipped = d.clamp(-config.epsilon_low, config.clip_high)
    kept = sign * torch.minimum(sign * d, sign * clipped)  # the pessimistic one of d and its clip, as A's sign says
    length = x.mask.sum(-1, keepdim=True).clamp_min(1)
    rho = torch.exp((kept * x.mask).sum(-1, keepdim=True) / length)  # (B, 1)
    moved = (d != clipped) & x.mask.bool()
    return Surrogate((-x.adv * rho).expand_as(d), moved & (x.adv < 0), moved & (x.adv > 0))


BATCH_COUPLED: tuple[str, ...] = ("kl_cov", "clip_cov")
"""Surrogates whose token loss reads every row of the call (a covariance over its tokens): not chunkable."""


def _token_covariance(x: SurrogateInputs) -> tuple[Tensor, Tensor]:
    """``(A_t - mean A)(logp_t - mean logp)`` over the call's real tokens (detached), and the real-token mask."""
    real = x.mask.bool()
    adv = x.adv.expand_as(x.logp).detach()
    logp = x.logp.detach()
    count = real.sum().clamp_min(1)
    mean_adv = torch.where(real, adv, 0.0).sum() / count
    mean_logp = torch.where(real, logp, 0.0).sum() / count
    return torch.where(real, (adv - mean_adv) * (logp - mean_logp), 0.0), real


@register_surrogate(
    "kl_cov",
    batch_oracle=reference.kl_cov_losses,
    fields=("kl_cov_ratio", "ppo_kl_coef"),
    formula="-A r, plus ppo_kl_coef abs(logp - old_logp) on the kl_cov_ratio share of tokens of largest cov(A, logp)",
    paper="Cui et al. 2025, The Entropy Mechanism of RL for Reasoning LMs (arXiv 2505.22617)",
    frameworks="verl kl_cov",
    peer_fields={"verl": {"policy_loss.kl_cov_ratio": "kl_cov_ratio", "policy_loss.ppo_kl_coef": "ppo_kl_coef"}},
)
def kl_cov(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""KL-Cov: ``-A r`` (no clip) on every token, plus ``ppo_kl_coef |logp - old_logp|`` on the
    ``max(1, floor(kl_cov_ratio n))`` real tokens (of the n in the call) with the largest covariance
    ``(A_t - mean A)(logp_t - mean logp)``: a covariance over the whole call's tokens."""
    cov, real = _token_covariance(x)
    n = int(real.sum())
    selected = torch.zeros_like(real)
    if n > 0:
        k = max(1, int(n * config.kl_cov_ratio))
        flat = torch.where(real, cov, -torch.inf).reshape(-1)
        selected.view(-1)[flat.topk(k).indices] = True
    penalty = config.ppo_kl_coef * (x.logp - x.old_logp).abs()
    loss = -x.adv * x.ratio + torch.where(selected, penalty, 0.0)
    never = torch.zeros_like(real)
    return Surrogate(loss, never, selected)


@register_surrogate(
    "clip_cov",
    batch_oracle=reference.clip_cov_losses,
    fields=("clip_low", "clip_high", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"),
    formula="PPO's -min(r A, clip(r) A), 0 on clip_cov_ratio of the tokens with lb < cov(A, logp) < ub, at random",
    paper="Cui et al. 2025, The Entropy Mechanism of RL for Reasoning LMs (arXiv 2505.22617)",
    frameworks="verl clip_cov",
    peer_fields={
        "verl": {
            "policy_loss.clip_cov_ratio": "clip_cov_ratio",
            "policy_loss.clip_cov_lb": "clip_cov_lb",
            "policy_loss.clip_cov_ub": "clip_cov_ub",
        }
    },
)
def clip_cov(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""Clip-Cov: PPO's clipped surrogate (no dual clip) with the loss of ``max(1, floor(clip_cov_ratio n))``
    tokens set to 0, drawn with ``torch.randperm`` (the global generator, as verl's) among the real tokens the clip
    leaves alone whose covariance ``(A_t - mean A)(logp_t - mean logp)`` lies strictly between ``clip_cov_lb`` and
    ``clip_cov_ub`` (in row-major order): a random choice over the whole call's tokens."""
    cov, real = _token_covariance(x)
    unclipped = -x.adv * x.ratio
    clipped = -x.adv * x.ratio.clamp(1 - config.epsilon_low, 1 + config.clip_high)
    by_clip = (clipped > unclipped) & real
    candidates = (real & ~by_clip & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)).nonzero()
    cut = torch.zeros_like(real)
    if len(candidates) > 0:
        k = max(int(config.clip_cov_ratio * int(real.sum())), 1)
        chosen = candidates[torch.randperm(len(candidates))[:k]]
        cut[chosen[:, 0], chosen[:, 1]] = True
    loss = torch.maximum(unclipped, clipped) * (~cut).to(unclipped.dtype)
    never = torch.zeros_like(real)
    return Surrogate(loss, never, cut)


def _required(config: LossConfig, field: str) -> float:
    value = getattr(config, field)
    if value is None:
        raise ValueError(f"surrogate {config.surrogate!r} needs {field} (a positive number); it is not set")
    return float(value)


def _check_vespo(config: LossConfig) -> None:
    from drgrpo.config import LossConfig  # the owner FieldError names (config imports this module)

    for field in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{field} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise FieldError(LossConfig, field, f"{field} must be finite, got {value}")
    if (config.sampling_correction or "").startswith("sequence"):
        raise FieldError(
            LossConfig,
            ("sampling_correction", "surrogate"),
            f"surrogate 'vespo' folds the sampler correction into its weight token by token: sampling_correction "
            f"must be 'token_truncate' or 'token_mask', got {config.sampling_correction!r} (as TRL requires)",
        )


@register_surrogate(
    "vespo",
    batch_oracle=reference.vespo_losses,
    fields=("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
    formula="-sg(phi(w)) A logp, phi(w) = exp(lambda + k log w - lambda w), w = prod_t r_t rho_t",
    paper="VESPO, 2026 (arXiv 2602.10693)",
    frameworks="TRL vespo",
    peer_fields={
        "trl": {f: f for f in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")},
    },
    folds_sampling_weight=True,
    whole_rows=True,
    check=_check_vespo,
)
def vespo(x: SurrogateInputs, config: LossConfig) -> Surrogate:
    r"""VESPO (arXiv 2602.10693): ``-sg(phi(w_i)) A_i logp_t``, a smooth, asymmetric Gamma weight of the completion's
    importance weight instead of a clip.

    ``log w_i = clamp(sum_t m_t clamp(log r_t, -20, 20) + sum_t m_t clamp(log rho_t, log 1e-8, 20), log 1e-8, 20)``
    with the token ratio ``r_t`` (whatever ``ratio_level``) and the sampler correction's weight ``rho_t`` (1
    without one), then ``phi(w) = exp(lambda + k log w - lambda w)`` (``phi(1) = 1``), with ``(k, lambda)`` the
    ``vespo_*_pos`` values when ``A_i >= 0``, else ``vespo_*_neg`` (lambda at least 1e-4); a non-finite phi is 0.
    """
    floor = math.log(1e-8)
    with torch.no_grad():
        log_r = (x.logp - x.old_logp).clamp(-20.0, 20.0)
        log_w = (log_r * x.mask).sum(-1, keepdim=True)  # (B, 1)
        if x.sampling_weight is not None:
            log_w = log_w + (torch.log(x.sampling_weight).clamp(floor, 20.0) * x.mask).sum(-1, keepdim=True)
        log_w = log_w.clamp(floor, 20.0)
        nonneg = x.adv >= 0  # (B, 1)
        k = torch.where(nonneg, log_w.new_tensor(config.vespo_k_pos), log_w.new_tensor(config.vespo_k_neg))
        lam = torch.where(
            nonneg, log_w.new_tensor(config.vespo_lambda_pos), log_w.new_tensor(config.vespo_lambda_neg)
        ).clamp_min(1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    never = torch.zeros_like(x.ratio, dtype=torch.bool)
    return Surrogate(-phi * x.adv * x.logp, never, never, weight=phi)
