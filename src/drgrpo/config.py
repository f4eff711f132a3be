"""Loss configuration: every choice of the GRPO family in one frozen dataclass, plus named presets.

A preset is a function returning a :class:`LossConfig`, registered under a name with
:func:`register_preset`. ``LossConfig.preset(name, **overrides)`` looks it up and applies
overrides by field name. The presets themselves live in :mod:`drgrpo.presets` (the papers'
losses) and :mod:`drgrpo.peers` (``trl.*``, ``verl.*``, ``oat.*``); both import this module and
register themselves, and ``import drgrpo`` (which runs before any ``drgrpo.*`` module) imports
both, so the registry is complete whichever module a caller imports first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from drgrpo.correction import SAMPLING_CORRECTIONS
from drgrpo.field_error import FieldError
from drgrpo.registry import SURROGATES

RatioLevel = Literal["token", "sequence"]
KLKind = Literal["k1", "k2", "k3", "low_var_kl", "abs"]
Aggregation = Literal[
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
    "token-sum-norm",
]
AdvantageStd = Literal["group", "batch", "none"]
SingletonAdvantage = Literal["zero", "reward"]
NanRewards = Literal["error", "ignore"]

RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3", "low_var_kl", "abs")
AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
    "token-sum-norm",
)
ADVANTAGE_STDS: tuple[str, ...] = ("group", "batch", "none")
NAN_REWARDS: tuple[str, ...] = ("error", "ignore")


@dataclass(frozen=True)
class LossConfig:
    """Every choice that distinguishes GRPO, Dr. GRPO, DAPO, BNPO, GSPO, CISPO and SAPO.

    The defaults are the Dr. GRPO paper's objective except for ``max_completion_length``,
    which has no universal value (use ``LossConfig.preset("dr_grpo", max_completion_length=L)``).
    """

    surrogate: str = "ppo"
    """Per-token surrogate, one of the registered members (docs/losses.md lists them): ppo, the clipped importance
    ratio; cispo, a clipped stop-gradient weight on the log-prob; sapo, a soft gate instead of the clip; vespo, a
    Gamma weight of the completion's importance weight."""
    ratio_level: RatioLevel = "token"
    """Importance ratio per token (token: r = exp(logp - old_logp)) or one per completion (sequence, GSPO: the exp
    of the mean of logp - old_logp over the completion's tokens)."""
    clip_low: float | None = 0.2
    """Lower clip range eps_low: the ratio is clipped below at 1 - eps_low; none: no lower clip (cispo only)."""
    clip_high: float = 0.2
    """Upper clip range eps_high: the ratio is clipped above at 1 + eps_high (DAPO's clip-higher: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (verl's clip_ratio_c): for a negative advantage A the per-token loss is capped at
    -c A; none: no dual clip."""
    delta: float | None = None
    """Two-sided clip (TRL's delta): the unclipped ratio is also clamped above at this value, which must exceed
    1 + ``clip_high``; none: off."""
    cispo_cap: float | None = None
    """Upper cap of the cispo surrogate's stop-gradient ratio weight; none: 1 + ``clip_high``."""
    sapo_tau_pos: float = 1.0
    """Temperature of the sapo gate for a positive advantage."""
    sapo_tau_neg: float = 1.05
    """Temperature of the sapo gate for a zero or negative advantage."""
    dro_beta: float | None = None
    """Weight of the dro surrogate's quadratic penalty on the log-ratio (verl's policy_loss option of the same
    name); the dro surrogate needs it set, and the others ignore it."""
    dppo_cap: float | None = 20.0
    """The dppo surrogates' cap c of the stop-gradient importance ratio, min(r, c) (verl's clip_ratio_c); none: no
    cap."""
    kl_cov_ratio: float = 0.0002
    """The kl_cov surrogate's share of the batch's real tokens (at least one), those of largest covariance between
    advantage and log-prob, that get the |logp - old_logp| penalty (verl's policy_loss option of the same name)."""
    ppo_kl_coef: float = 0.1
    """The kl_cov surrogate's weight of that penalty (verl's policy_loss option of the same name)."""
    clip_cov_ratio: float = 0.0002
    """The clip_cov surrogate's share of the batch's real tokens (at least one) whose gradient is cut, drawn at
    random among the unclipped tokens whose covariance lies strictly between ``clip_cov_lb`` and ``clip_cov_ub``
    (verl's policy_loss option of the same name)."""
    clip_cov_lb: float = 1.0
    """The clip_cov surrogate's lower bound of the covariance of a token that may be cut."""
    clip_cov_ub: float = 5.0
    """The clip_cov surrogate's upper bound of the covariance of a token that may be cut."""
    vespo_k_pos: float = 2.0
    """VESPO's power k for a non-negative advantage: the weight phi(w) = exp(lambda + k log w - lambda w) of the
    completion's importance weight w (TRL's option of the same name)."""
    vespo_lambda_pos: float = 3.0
    """VESPO's decay lambda for a non-negative advantage (at least 1e-4 is used)."""
    vespo_k_neg: float = 3.0
    """VESPO's power k for a negative advantage."""
    vespo_lambda_neg: float = 2.0
    """VESPO's decay lambda for a negative advantage (at least 1e-4 is used)."""
    kl: KLKind = "k3"
    """KL estimator per token, with d = ref - logp (ref: the reference model's log-prob): k1 = -d,
    k2 = d^2 / 2, k3 = exp(d) - d - 1, low_var_kl = k3 clamped (verl), abs = |d|."""
    beta: float = 0.0
    """KL coefficient: each token's loss gets + beta * kl (0: no penalty, and no reference model needed)."""
    kl_importance_weight: bool = False
    """Multiply each token's KL by the importance ratio (unclipped, differentiable) before adding it: TRL's
    use_bias_correction_kl, on by default there (DeepSeek-V3.2)."""
    aggregation: Aggregation = "seq-mean-token-sum-norm"
    """How the per-token losses become one number: seq-mean-token-mean divides each completion's sum by its
    length |o_i| (GRPO), seq-mean-token-sum-norm by the constant L (Dr. GRPO), token-mean averages all tokens
    (DAPO); docs/design.md gives the weight of every choice."""
    max_completion_length: int | None = None
    """The constant L that seq-mean-token-sum-norm divides by (Dr. GRPO: the generation budget; drgrpo train sets
    it to --max-new-tokens); with token-sum-norm, none means the padded width T of each call (verl 0.7 and
    earlier)."""
    forced_aggregation: Aggregation | None = None
    """Used instead of ``aggregation`` when set (verl 0.9.1's sapo loss mode aggregates its surrogate with
    seq-mean-token-mean whatever its loss_agg_mode says); with ``beta`` above 0 it must equal ``aggregation``;
    none: off."""
    advantage_std: AdvantageStd = "none"
    """Advantage scaling: the reward minus its group's mean is divided by the group's std (group), the whole
    batch's std (batch), or nothing (none, Dr. GRPO)."""
    std_unbiased: bool = True
    """Use the unbiased std (divide by n - 1) rather than the population std (divide by n)."""
    std_eps: float = 0.0
    """Added to the std before dividing by it (TRL 1e-4, verl 1e-6, oat 1e-8)."""
    std_zero_threshold: float | None = None
    """A group (or batch) whose std is below this gets advantage 0 everywhere (the specification's 1e-8 rule);
    none: off."""
    singleton_advantage: SingletonAdvantage = "zero"
    """Advantage of a group of one completion: zero (r - mean = 0), or reward (verl: mean 0 and std 1, so
    A = r / (1 + ``std_eps``), or r without the std division)."""
    nan_rewards: NanRewards = "error"
    """What a NaN reward does: error raises; ignore (TRL) leaves it out of the statistics with advantage 0."""
    sampling_correction: str | None = None
    """Correct for the sampler's own log-probs (vLLM's, passed to the loss): each token's surrogate is multiplied by
    a weight from d = old - sampler log-prob, per token (token_truncate, token_mask) or exp of the completion's sum
    (sequence_truncate, sequence_mask), clamped into [``sampling_clip_min``, ``sampling_clip_max``] (truncate) or 0
    outside it (mask), as TRL's vLLM importance-sampling modes; none: off."""
    sampling_clip_min: float | None = None
    """Lower bound of the sampling correction's weight; none: no bound."""
    sampling_clip_max: float | None = 3.0
    """Upper bound of the sampling correction's weight; none: no bound."""
    off_policy_mask_threshold: float | None = None
    """Drop a completion whose advantage is negative and whose mean of (sampler log-prob - log-prob) over its tokens
    exceeds this (DeepSeek-V3.2's off-policy sequence mask; the old log-probs without a sampler's); none: off."""
    top_entropy_quantile: float = 1.0
    """Train on the high-entropy tokens only: a token's surrogate counts iff its entropy is at or above the
    1 - q quantile of the entropies (Beyond the 80/20 rule; TRL's option of the same name); 1: every token."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss gets minus this times the mean entropy of the tokens trained on; 0: off."""
    per_call_normalization: bool = False
    """True for peer presets whose denominators are defined per call (per micro-batch); they refuse a step normalizer."""
    name: str | None = None
    """The preset this config came from (informational)."""

    def __post_init__(self) -> None:
        _check_choice("surrogate", self.surrogate, SURROGATES.names())
        _check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _check_choice("kl", self.kl, KL_KINDS)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("advantage_std", self.advantage_std, ADVANTAGE_STDS)
        _check_choice("nan_rewards", self.nan_rewards, NAN_REWARDS)
        if self.forced_aggregation is not None:
            _check_choice("forced_aggregation", self.forced_aggregation, AGGREGATIONS)
        _check_choice("singleton_advantage", self.singleton_advantage, ("zero", "reward"))
        if self.clip_low is not None:
            _check_nonnegative("clip_low", self.clip_low)
        elif self.surrogate != "cispo":
            raise FieldError(
                LossConfig,
                ("clip_low", "surrogate"),
                f"clip_low none (no lower clip) needs surrogate 'cispo', got {self.surrogate!r}",
            )
        _check_finite("clip_high", self.clip_high)
        if self.clip_high <= 0:
            raise FieldError(LossConfig, "clip_high", f"clip_high must be positive, got {self.clip_high}")
        if self.dual_clip is not None:
            _check_finite("dual_clip", self.dual_clip)
            if self.dual_clip <= 1:
                raise FieldError(
                    LossConfig,
                    "dual_clip",
                    f"dual_clip must be > 1 (verl's clip_ratio_c, typically 3), got {self.dual_clip}",
                )
        if self.delta is not None:
            _check_finite("delta", self.delta)
            if self.delta <= 1 + self.clip_high:
                raise FieldError(
                    LossConfig,
                    ("delta", "clip_high"),
                    f"delta must be > 1 + clip_high = {1 + self.clip_high}, got {self.delta}",
                )
        if self.cispo_cap is not None:
            _check_finite("cispo_cap", self.cispo_cap)
            if self.cispo_cap <= 0:
                raise FieldError(LossConfig, "cispo_cap", f"cispo_cap must be positive, got {self.cispo_cap}")
        for field in ("kl_cov_ratio", "clip_cov_ratio"):
            _check_finite(field, getattr(self, field))
            if not 0 < getattr(self, field) <= 1:
                raise FieldError(LossConfig, field, f"{field} must be in (0, 1], got {getattr(self, field)}")
        for field in ("ppo_kl_coef", "clip_cov_lb", "clip_cov_ub"):
            _check_finite(field, getattr(self, field))
        for field in ("dro_beta", "dppo_cap"):
            value = getattr(self, field)
            if value is not None:
                _check_finite(field, value)
                if value <= 0:
                    raise FieldError(LossConfig, field, f"{field} must be positive, got {value}")
        for field in ("sapo_tau_pos", "sapo_tau_neg"):
            value = getattr(self, field)
            _check_finite(field, value)
            if value <= 0:
                raise FieldError(LossConfig, field, f"{field} must be positive, got {value}")
        _check_nonnegative("beta", self.beta)
        if self.forced_aggregation not in (None, self.aggregation) and self.beta != 0:
            raise FieldError(
                LossConfig,
                ("forced_aggregation", "aggregation", "beta"),
                f"forced_aggregation {self.forced_aggregation!r} differs from aggregation {self.aggregation!r} while "
                f"beta is {self.beta}: the peer (verl's sapo) aggregates its surrogate term one way and its KL term "
                f"the other, but drgrpo applies one rule to both; set aggregation to {self.forced_aggregation!r} "
                "or beta to 0",
            )
        self._check_sampling_fields()
        member = SURROGATES.get(self.surrogate)
        if member.check is not None:
            member.check(self)  # the surrogate's own rules for its fields
        _check_nonnegative("std_eps", self.std_eps)
        if self.std_zero_threshold is not None:
            _check_nonnegative("std_zero_threshold", self.std_zero_threshold)
        if self.max_completion_length is not None:
            if isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int):
                raise TypeError(
                    f"max_completion_length must be an int, got {type(self.max_completion_length).__name__}"
                )
            if self.max_completion_length < 1:
                raise FieldError(
                    LossConfig,
                    "max_completion_length",
                    f"max_completion_length must be >= 1, got {self.max_completion_length}",
                )

    def _check_sampling_fields(self) -> None:
        if self.sampling_correction is not None:
            _check_choice("sampling_correction", self.sampling_correction, SAMPLING_CORRECTIONS)
        for field in ("sampling_clip_min", "sampling_clip_max"):
            if getattr(self, field) is not None:
                _check_nonnegative(field, getattr(self, field))
        low, high = self.sampling_clip_min, self.sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise FieldError(
                LossConfig,
                ("sampling_clip_min", "sampling_clip_max"),
                f"sampling_clip_min must be below sampling_clip_max, got {low} >= {high}",
            )
        if (self.sampling_correction or "").endswith("truncate") and low is None and high is None:
            raise FieldError(
                LossConfig,
                ("sampling_correction", "sampling_clip_min", "sampling_clip_max"),
                f"sampling_correction {self.sampling_correction!r} clamps the weight: set sampling_clip_min or "
                "sampling_clip_max",
            )
        if self.off_policy_mask_threshold is not None:
            _check_finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
        _check_finite("top_entropy_quantile", self.top_entropy_quantile)
        if not 0 <= self.top_entropy_quantile <= 1:
            raise FieldError(
                LossConfig,
                "top_entropy_quantile",
                f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}",
            )
        _check_finite("entropy_coef", self.entropy_coef)

    @property
    def effective_aggregation(self) -> str:
        """The aggregation the loss uses: the one its surrogate forces (``forced_aggregation``), else ``aggregation``."""
        return self.forced_aggregation or self.aggregation

    @property
    def divides_by_constant_length(self) -> bool:
        """True when the loss divides by the constant L = ``max_completion_length`` (``seq-mean-token-sum-norm``)."""
        return self.effective_aggregation == "seq-mean-token-sum-norm"

    @property
    def epsilon_low(self) -> float:
        """Alias of ``clip_low`` under TRL's name (0 when there is no lower clip)."""
        return 0.0 if self.clip_low is None else self.clip_low

    def replace(self, **overrides: Any) -> LossConfig:
        """A copy with the given fields replaced (unknown names raise a ValueError listing the fields)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown LossConfig field(s) {unknown}; valid fields: {valid}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LossConfig:
        """The named preset with ``overrides`` applied, e.g. ``LossConfig.preset("dr_grpo", max_completion_length=512)``.

        Raises ValueError for an unknown name (listing the valid names) and for ``dr_grpo``
        without ``max_completion_length``.
        """
        config = preset_config(name).replace(**overrides)
        check_constant_length(config.effective_aggregation, config.max_completion_length, f"preset {name!r}: ")
        return config


# --------------------------------------------------------------------------- registry

_PRESETS: dict[str, Callable[[], LossConfig]] = {}
"""Preset name -> zero-argument factory; filled by :func:`register_preset`."""


def register_preset(name: str) -> Callable[[Callable[[], LossConfig]], Callable[[], LossConfig]]:
    """Decorator registering a zero-argument function that returns a :class:`LossConfig` under ``name``."""

    def decorator(fn: Callable[[], LossConfig]) -> Callable[[], LossConfig]:
        if name in _PRESETS:
            raise ValueError(f"a preset named {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return decorator


def preset_config(name: str) -> LossConfig:
    """The preset ``name`` exactly as registered: no overrides, and no check that a constant L is set.

    For introspection (e.g. reading ``per_call_normalization``); use :meth:`LossConfig.preset` to train.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    return _PRESETS[name]()


def preset_names() -> list[str]:
    """All registered preset names, sorted (core and peer presets: ``import drgrpo`` registers both)."""
    return sorted(_PRESETS)


# --------------------------------------------------------------------------- checks


def check_constant_length(aggregation: str, length: int | None, where: str = "") -> None:
    """The one "needs L" rule: ``seq-mean-token-sum-norm`` divides by a constant L, so ``length`` must be set.

    ``where`` prefixes the message (e.g. the preset's name). Used by presets, step normalisers and the loss.
    """
    if aggregation == "seq-mean-token-sum-norm" and length is None:
        raise ValueError(
            f"{where}aggregation 'seq-mean-token-sum-norm' divides by a constant L: set max_completion_length "
            "(pass max_completion_length=L; Dr. GRPO uses the generation budget, e.g. the max new tokens)"
        )


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FieldError(LossConfig, field, f"{field} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_finite(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise FieldError(LossConfig, field, f"{field} must be finite, got {value}")


def _check_nonnegative(field: str, value: object) -> None:
    _check_finite(field, value)
    assert isinstance(value, (int, float))
    if value < 0:
        raise FieldError(LossConfig, field, f"{field} must be >= 0, got {value}")
