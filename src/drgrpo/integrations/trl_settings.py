r"""One loss, two descriptions: a TRL ``GRPOConfig`` and a drgrpo ``LossConfig`` made to agree.

``DrGRPOTrainer(..., loss_config=...)`` reads its loss from ``loss_config``, while TRL (and whoever reads
``trainer.args``: loggers, checkpoints, people) reads ``GRPOConfig``. :func:`resolve_loss_config` makes them
describe the same run, by this policy (docs/trl.md, "Settings"):

1. **No** ``loss_config``: the loss is the one ``GRPOConfig`` describes, ``trl.<loss_type>`` with every
   field read from ``GRPOConfig`` (:func:`loss_config_from_args`), so ``DrGRPOTrainer(model, rewards, args)``
   computes stock TRL's loss; nothing in ``args`` changes.
2. A ``loss_config``: it decides the loss. Each ``GRPOConfig`` field that describes the same choice
   (:data:`FIELD_MAP`) either agrees, or is at its ``GRPOConfig`` default and is set to the config's value in
   ``trainer.args`` (the trainer logs a WARNING naming field, old and new value: TRL cannot tell a default
   from an explicit value such as ``beta=0.0``), or raises a ``ValueError`` naming the field and how to put the
   value into the loss config instead. ``loss_type`` becomes the TRL loss type with the config's surrogate and
   aggregation (:func:`trl_loss_type`), or ``"drgrpo"`` (:data:`DRGRPO_LOSS_TYPE`) when TRL has none.
3. Every config runs with ``nan_rewards="ignore"``: a reward function returning ``None`` means "not scored",
   as in TRL (left out of the group statistics, advantage 0).
4. A config that cannot run (a constant L it does not have) fails here, at construction, not after the first
   generation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from trl import GRPOConfig

from drgrpo.config import LossConfig, preset_config, preset_names
from drgrpo.normalizer import check_step_normalizable
from drgrpo.registry import SURROGATES
from drgrpo.surrogates import cispo_cap

__all__ = [
    "DRGRPO_LOSS_TYPE",
    "FIELD_MAP",
    "RUN_FIELDS",
    "TRL_DEFAULTS",
    "command_line_hints",
    "loss_config_from_args",
    "loss_config_hint",
    "resolve_loss_config",
    "setting_hint",
    "settings_warning",
    "trl_loss_type",
]

DRGRPO_LOSS_TYPE = "drgrpo"
"""``trainer.args.loss_type`` when no TRL loss type has the config's loss (``trainer.loss_config`` describes it)."""

TRL_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
"""Every ``GRPOConfig`` field's default (read from TRL's dataclass)."""


def _field_map() -> dict[str, str]:
    fields = {
        "scale_rewards": "advantage_std",
        "beta": "beta",
        "importance_sampling_level": "ratio_level",
        "use_bias_correction_kl": "kl_importance_weight",
    }
    for member in SURROGATES:  # each surrogate's own settings (ppo: epsilon, epsilon_high, delta; sapo: temperatures)
        for trl_field, field in member.peer_fields.get("trl", {}).items():
            fields.setdefault(trl_field, field)
    return fields


RUN_FIELDS: dict[str, str] = {
    "vllm_importance_sampling_mode": "sampling_correction",
    "vllm_importance_sampling_clip_min": "sampling_clip_min",
    "vllm_importance_sampling_clip_max": "sampling_clip_max",
    "off_policy_mask_threshold": "off_policy_mask_threshold",
    "top_entropy_quantile": "top_entropy_quantile",
    "entropy_coef": "entropy_coef",
}
"""``GRPOConfig`` fields of the run's corrections, masks and entropy bonus -> ``LossConfig`` fields: a loss config
that leaves one off takes the run's (the vLLM correction applies when ``use_vllm`` and
``vllm_importance_sampling_correction``; with ``use_adaptive_entropy`` the trainer moves the coefficient each step)."""

FIELD_MAP: dict[str, str] = {**_field_map(), **RUN_FIELDS}
"""``GRPOConfig`` field -> the ``LossConfig`` field that describes the same choice (``epsilon_high`` is the CISPO
cap, ``cispo_cap``, for a CISPO loss with no lower clip: each surrogate's ``peer_fields["trl"]`` says which).
``loss_type`` maps to surrogate and aggregation."""

_PER_CALL_LOSS_TYPES = {"trl.grpo": "grpo", "trl.bnpo": "bnpo", "trl.dr_grpo": "dr_grpo", "trl.luspo": "luspo"}


def _trl_loss_types() -> tuple[str, ...]:
    """The TRL loss types drgrpo has a ``trl.<loss_type>`` preset for."""
    return tuple(name.removeprefix("trl.") for name in preset_names() if name.startswith("trl."))


# --------------------------------------------------------------------------- fix hints, in the user's syntax

_COMMAND_LINE: ContextVar[bool] = ContextVar("drgrpo_trl_command_line", default=False)


@contextmanager
def command_line_hints() -> Iterator[None]:
    """Inside this block the fix hints of errors and warnings are command-line flags (``drgrpo trl``,
    ``python -m drgrpo.integrations.trl``: ``--loss_config '{"preset": ...}'``, ``--beta 0.0``), not Python."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def setting_hint(name: str, value: Any) -> str:
    """How the user sets a ``GRPOConfig`` field (or ``DrGRPOTrainer`` argument) where they are:
    ``beta=0.0`` from Python, ``--beta 0.0`` on the command line."""
    if _COMMAND_LINE.get():
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return f"--{name} {shown}"
    return f"{name}={value!r}"


def loss_config_hint(config: LossConfig, **fields: Any) -> str:
    """How the user passes ``config`` with ``fields`` replaced, where they are.

    A preset's config is written as the preset and every field that differs from it (so the user's own
    changes are kept): ``loss_config=LossConfig.preset('dapo', clip_low=0.1)`` from Python, ``--loss_config
    '{"preset": "dapo", "clip_low": 0.1}'`` on the command line; a config from no preset as
    ``loss_config=loss_config.replace(...)``.
    """
    if config.name is None:
        return "loss_config=loss_config.replace(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"
    preset = preset_config(config.name)
    changed = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in ("name", "nan_rewards", *fields) and getattr(config, f.name) != getattr(preset, f.name)
    }
    changed.update(fields)
    if _COMMAND_LINE.get():
        if not changed:
            return f"--loss_config {config.name}"
        return "--loss_config '" + json.dumps({"preset": config.name, **changed}) + "'"
    arguments = "".join(f", {k}={v!r}" for k, v in changed.items())
    return f"loss_config=LossConfig.preset({config.name!r}{arguments})"


def _preset_name_hint(name: str) -> str:
    """A preset passed by name, where the user is: ``loss_config='dr_grpo'`` or ``--loss_config dr_grpo``."""
    return f"--loss_config {name}" if _COMMAND_LINE.get() else f"loss_config={name!r}"


# --------------------------------------------------------------------------- the policy


def resolve_loss_config(loss_config: LossConfig | str | None, args: GRPOConfig) -> tuple[LossConfig, dict[str, Any]]:
    """The loss config of a TRL run, and the ``GRPOConfig`` fields to set so that ``args`` describes it.

    Args:
        loss_config: ``None`` (the loss ``args`` describes: :func:`loss_config_from_args`), a preset name (one
            that divides by a constant L, e.g. ``"dr_grpo"``, takes ``L = args.max_completion_length``), or a
            :class:`~drgrpo.LossConfig`.
        args: the run's ``GRPOConfig`` (not modified).

    Returns:
        ``(config, changes)``: ``config`` with ``nan_rewards="ignore"`` (TRL's meaning of a ``None`` reward);
        ``changes`` maps each ``GRPOConfig`` field at its default that differs from the config to the config's
        value (see :func:`settings_warning` for the message).

    Raises:
        TypeError: ``loss_config`` is not a LossConfig, a str or None.
        ValueError: a ``GRPOConfig`` field set to a non-default value contradicts the config; the config cannot
            run (no constant L where it needs one).
    """
    if loss_config is None:
        config, changes = loss_config_from_args(args), {}
    else:
        config = _as_config(loss_config, args)
        changes = _aligned_fields(config, args)
        config = _with_run_modifiers(config, args, changes)
    _check_runnable(config, args)
    return config.replace(nan_rewards="ignore"), changes


def loss_config_from_args(args: GRPOConfig) -> LossConfig:
    """The loss stock TRL computes for ``args``: the ``trl.<loss_type>`` preset with ``args``' fields.

    Raises:
        ValueError: for a ``loss_type`` drgrpo has no ``trl.*`` preset for.
    """
    loss_type = args.loss_type
    if loss_type not in _trl_loss_types():
        raise ValueError(
            f"GRPOConfig.loss_type={loss_type!r} has no drgrpo equivalent (drgrpo reproduces TRL's "
            f"{', '.join(repr(t) for t in _trl_loss_types())}): choose the loss with a preset, e.g. "
            f"{_preset_name_hint('dr_grpo')}"
        )
    high = args.epsilon if args.epsilon_high is None else args.epsilon_high  # TRL: unset means epsilon
    fields: dict[str, Any] = {
        "advantage_std": args.scale_rewards,
        "beta": args.beta,
        "ratio_level": args.importance_sampling_level,
        "kl_importance_weight": args.use_bias_correction_kl,
    }
    # the surrogate's own settings (TRL's CISPO cap is epsilon_high)
    for trl_field, field in _trl_fields(preset_config(f"trl.{loss_type}")).items():
        fields[field] = high if trl_field == "epsilon_high" else getattr(args, trl_field)
    if loss_type == "dr_grpo":
        fields["max_completion_length"] = args.max_completion_length
    if args.use_vllm and args.vllm_importance_sampling_correction:  # TRL's correction of vLLM's sampling
        fields.update({field: getattr(args, name) for name, field in RUN_FIELDS.items() if name.startswith("vllm")})
    for name in ("off_policy_mask_threshold", "top_entropy_quantile", "entropy_coef"):
        fields[name] = getattr(args, name)
    return LossConfig.preset(f"trl.{loss_type}", **fields)


def trl_loss_type(config: LossConfig, max_completion_length: int | None) -> str:
    """The TRL ``loss_type`` whose loss is ``config``'s (the other fields set as :func:`resolve_loss_config` sets
    them), or :data:`DRGRPO_LOSS_TYPE` when TRL has no such loss.

    TRL's ``loss_type`` fixes the surrogate, the aggregation and (with ``beta > 0``) the k3 KL: ``grpo`` is the
    mean over completions of each completion's token mean, ``dapo`` the token mean over the step, ``dr_grpo``
    the mean over completions of each token sum divided by ``max_completion_length``, ``cispo`` the capped
    stop-gradient weight with a token mean, ``sapo`` the soft gate aggregated like ``grpo``, ``luspo`` the clip
    with the mean over completions of each token sum, ``vespo`` the Gamma weight with a token mean. The per-call
    presets (``trl.grpo``, ``trl.bnpo``, ``trl.dr_grpo``, ``trl.luspo``) are their loss types by definition.
    """
    if config.name in _PER_CALL_LOSS_TYPES:
        return _PER_CALL_LOSS_TYPES[config.name]
    aggregation = config.effective_aggregation
    if config.beta != 0 and config.kl != "k3":
        return DRGRPO_LOSS_TYPE
    if config.surrogate == "ppo" and config.dual_clip is None:
        if aggregation == "seq-mean-token-mean":
            return "grpo"
        if aggregation == "token-mean":
            return "dapo"
        if aggregation == "seq-mean-token-sum-norm" and config.max_completion_length == max_completion_length:
            return "dr_grpo"
        if aggregation == "seq-mean-token-sum":  # each completion's token sum, mean over completions
            return "luspo"
    if config.surrogate == "vespo" and aggregation == "token-mean":
        return "vespo"
    if config.surrogate == "cispo" and config.clip_low is None and aggregation == "token-mean":
        return "cispo"
    if config.surrogate == "sapo" and aggregation == "seq-mean-token-mean":
        return "sapo"
    return DRGRPO_LOSS_TYPE


def settings_warning(config: LossConfig, changes: dict[str, Any], args: GRPOConfig) -> str | None:
    """The WARNING for ``changes`` (from :func:`resolve_loss_config`): each field with its old and new value."""
    if not changes:
        return None
    lines = []
    for name, new in changes.items():
        old = getattr(args, name)
        line = f"{name} {_show(old)} -> {_show(new)}"
        if name == "beta" and new > 0 and old == 0:
            line += (
                f" (TRL now builds a reference model; for no KL term pass {loss_config_hint(config, beta=0.0)})"
                if config.name
                else " (TRL now builds a reference model)"
            )
        elif name == "loss_type" and new == DRGRPO_LOSS_TYPE:
            line += " (no TRL loss type computes this loss; trainer.loss_config describes it)"
        lines.append(line)
    return (
        f"DrGRPOTrainer: loss_config {_label(config)} decides the loss; these GRPOConfig fields were at their "
        "defaults and now hold its values in trainer.args (set them to these values yourself to silence this "
        "warning): " + "; ".join(lines)
    )


# --------------------------------------------------------------------------- the parts


def _as_config(loss_config: LossConfig | str, args: GRPOConfig) -> LossConfig:
    """A preset name with L from ``args`` where it needs one, or the LossConfig as given."""
    if isinstance(loss_config, str):
        config = LossConfig.preset(loss_config, max_completion_length=args.max_completion_length)
        if not config.divides_by_constant_length:
            config = LossConfig.preset(loss_config)  # L unused, or (token-sum-norm) the padded width by definition
    elif isinstance(loss_config, LossConfig):
        config = loss_config
    else:
        raise TypeError(
            f"loss_config must be a LossConfig, a preset name (str) or None, got {type(loss_config).__name__}"
        )
    if config.name == "trl.dr_grpo" and config.max_completion_length != args.max_completion_length:
        raise ValueError(
            f"trl.dr_grpo divides by TRL's max_completion_length ({args.max_completion_length}), but the loss "
            f"config has max_completion_length={config.max_completion_length}: pass the preset by name "
            f"({_preset_name_hint('trl.dr_grpo')}), or use the core 'dr_grpo' preset for another constant L"
        )
    return config


def _aligned_fields(config: LossConfig, args: GRPOConfig) -> dict[str, Any]:
    """The GRPOConfig fields to set from ``config``; raises for a non-default field that contradicts it."""
    changes: dict[str, Any] = {}
    loss_type = trl_loss_type(config, args.max_completion_length)
    if args.loss_type != loss_type:
        # The default, or the config's own name (drgrpo's "bnpo" is TRL's "dapo": the step's token mean), is replaced.
        if args.loss_type not in (TRL_DEFAULTS["loss_type"], _base_name(config)):
            peer = f"trl.{args.loss_type}"
            own = (
                f"TRL's {args.loss_type!r} loss is {_preset_name_hint(peer)}"
                if peer in preset_names()
                else f"drgrpo has no preset for TRL's {args.loss_type!r} loss"
            )
            set_it = "" if loss_type == DRGRPO_LOSS_TYPE else f" or set it to {loss_type!r}"
            raise ValueError(
                f"GRPOConfig.loss_type={args.loss_type!r} contradicts loss_config {_label(config)}, whose TRL loss "
                f"type is {loss_type!r}. DrGRPOTrainer's loss is the loss config's: leave loss_type at its default "
                f"({TRL_DEFAULTS['loss_type']!r}){set_it}, and choose the loss with the loss config ({own})"
            )
        changes["loss_type"] = loss_type
    for name, value in _trl_view(config).items():
        current = getattr(args, name)
        effective = args.epsilon if name == "epsilon_high" and current is None else current  # TRL: None = epsilon
        if _same(effective, value):
            continue
        if not _same(current, TRL_DEFAULTS[name]):
            _contradiction(name, current, config, value)
        changes[name] = value
    return changes


def _trl_view(config: LossConfig) -> dict[str, Any]:
    """The GRPOConfig fields that describe the same choices as ``config`` (``FIELD_MAP``), with its values."""
    view: dict[str, Any] = {
        "scale_rewards": config.advantage_std,
        "beta": config.beta,
        "importance_sampling_level": config.ratio_level,
    }
    if config.beta > 0:
        view["use_bias_correction_kl"] = config.kl_importance_weight
    if config.surrogate == "cispo" and config.clip_low is not None:
        return view  # TRL's cispo has no lower clip: no TRL field describes this one
    for trl_field, field in _trl_fields(config).items():
        view[trl_field] = _config_value(config, field)  # TRL caps the CISPO weight at epsilon_high itself
    return view


def _with_run_modifiers(config: LossConfig, args: GRPOConfig, changes: dict[str, Any]) -> LossConfig:
    """The run's sampling correction, masks and entropy bonus (:data:`RUN_FIELDS`) in ``config``.

    A modifier the loss config leaves off is the run's: TRL's correction of vLLM's sampling (``use_vllm`` with
    ``vllm_importance_sampling_correction``, TRL's default), ``off_policy_mask_threshold``, ``top_entropy_quantile``
    and ``entropy_coef`` apply to the config's loss. One the config sets must agree with ``args``: a field at its
    default is set from it (into ``changes``), any other value raises. A config's correction needs the sampler's
    log-probs, which TRL has only with ``use_vllm``.
    """
    correction_on = args.use_vllm and args.vllm_importance_sampling_correction
    if config.sampling_correction is None:
        if correction_on:
            config = config.replace(
                **{field: getattr(args, name) for name, field in RUN_FIELDS.items() if name.startswith("vllm")}
            )
    elif not correction_on:
        reason = f"set {setting_hint('use_vllm', True)}" if not args.use_vllm else "leave it at its default (True)"
        fix = loss_config_hint(config, sampling_correction=None)
        raise ValueError(
            f"loss_config {_label(config)} has sampling_correction={config.sampling_correction!r}, which weights each "
            "token by the sampler's log-probs; TRL has them when it generates with vLLM and corrects for it "
            f"(vllm_importance_sampling_correction={args.vllm_importance_sampling_correction}, "
            f"use_vllm={args.use_vllm}): {reason}, or take the correction out of the loss config: {fix}"
        )
    off = {f.name: f.default for f in dataclasses.fields(LossConfig)}  # a modifier at this value is off
    for name, field in RUN_FIELDS.items():
        value, current = getattr(config, field), getattr(args, name)
        if name.startswith("vllm"):
            if config.sampling_correction is None:
                continue
        elif _same(value, off[field]):
            config = config.replace(**{field: current})  # the run's (or off)
            continue
        if _same(current, value):
            continue
        if not _same(current, TRL_DEFAULTS[name]):
            _contradiction(name, current, config, value)
        changes[name] = value
    return config


def _trl_fields(config: LossConfig) -> dict[str, str]:
    """The config's surrogate's own GRPOConfig fields -> LossConfig fields (its registered ``peer_fields``)."""
    return dict(SURROGATES.get(config.surrogate).peer_fields.get("trl", {}))


def _contradiction(name: str, current: Any, config: LossConfig, implied: Any) -> None:
    """A non-default GRPOConfig field that contradicts the config: the error names it and the LossConfig fix."""
    field = _trl_fields(config).get(name, FIELD_MAP[name])  # epsilon_high is CISPO's cispo_cap
    raise ValueError(
        f"GRPOConfig.{name}={current!r} contradicts loss_config {_label(config)}, which implies {name}={implied!r} "
        f"({field}={_config_value(config, field)!r}). DrGRPOTrainer's loss is the loss config's: leave {name} at its "
        f"default ({TRL_DEFAULTS[name]!r}), or put the value into the loss config: "
        f"{loss_config_hint(config, **{field: current})}"
    )


def _check_runnable(config: LossConfig, args: GRPOConfig) -> None:
    """Raise now, before any generation, if the step normaliser could not be built for ``config``."""
    if config.per_call_normalization:
        return
    try:
        check_step_normalizable(config, config.max_completion_length)
    except ValueError as error:
        raise ValueError(
            f"loss_config {_label(config)} cannot run: {error}. For this run's generation budget pass "
            f"{loss_config_hint(config, max_completion_length=args.max_completion_length)}, or the preset by name "
            f"({_preset_name_hint('dr_grpo')} takes max_completion_length from the TRL arguments)"
        ) from None


def _config_value(config: LossConfig, field: str) -> Any:
    return cispo_cap(config) if field == "cispo_cap" else getattr(config, field)


def _base_name(config: LossConfig) -> str | None:
    """``"dr_grpo"`` for ``dr_grpo`` and ``trl.dr_grpo``: the TRL name a preset carries."""
    return None if config.name is None else config.name.removeprefix("trl.")


def _label(config: LossConfig) -> str:
    return repr(config.name) if config.name else "(a custom LossConfig)"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and float(a) == float(b)
    return bool(a == b)


def _show(value: Any) -> str:
    """A GRPOConfig value as people write it: 'unset' for None."""
    return "unset" if value is None else repr(value)
