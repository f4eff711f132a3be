r"""drgrpo's presets as verl policy-loss modes: ``actor_rollout_ref.actor.policy_loss.loss_mode=drgrpo.<preset>``.

Installing drgrpo with its ``verl`` extra (from a clone: ``pip install -e '.[verl]'``) declares this module as a
``verl.plugins`` entry point, so ``import verl`` registers one policy loss per step-wide preset on every Ray
worker. Each computes one micro-batch's share of the mini-batch's loss with a
:class:`~drgrpo.normalizer.StepNormalizer` from verl's ``global_batch_info``. The formula, which verl settings are
read and which ignored, and the KL term: docs/design.md, section 9.4; how to use it: docs/verl.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from drgrpo.advantages import OUTCOME_ESTIMATORS, outcome_advantages
from drgrpo.aggregation import token_weights
from drgrpo.config import LossConfig, preset_config, preset_names
from drgrpo.loss import PerTokenLoss, loss_metrics, per_token_loss, validate_inputs
from drgrpo.normalizer import StepNormalizer
from drgrpo.registry import SURROGATES

try:
    from verl.trainer.ppo.core_algos import (
        ADV_ESTIMATOR_REGISTRY,
        POLICY_LOSS_REGISTRY,
        register_adv_est,
        register_policy_loss,
    )
except ImportError as err:  # pragma: no cover - exercised in the main environment, where verl is absent
    raise ImportError(
        "drgrpo.integrations.verl needs verl (>=0.9.1,<0.10): from a clone of drgrpo, pip install -e '.[verl]'; "
        "verl pins transformers<5.11, so give it its own virtual environment (bash scripts/setup.sh verl makes "
        ".venv-verl)"
    ) from err

__all__ = [
    "LOSS_PREFIX",
    "REQUIRED_BATCH_INFO",
    "completion_advantages",
    "follows_loss_agg_mode",
    "loss_config",
    "make_advantage_estimator",
    "make_bypass_loss",
    "make_policy_loss",
    "register_estimators",
    "register_losses",
    "step_normalizer",
]

LOSS_PREFIX = "drgrpo."
"""verl's ``loss_mode`` of preset ``p`` is ``LOSS_PREFIX + p``."""

REQUIRED_BATCH_INFO = ("dp_size", "batch_num_tokens", "global_batch_size")
"""The fields of verl's ``config.global_batch_info`` the step normaliser is built from."""

_NEEDS_L = ("seq-mean-token-sum-norm", "token-sum-norm")

VERL_LOSS_MODES = (
    "vanilla",
    "gspo",
    "sapo",
    "cispo",
    "gpg",
    "dro",
    "dppo_tv",
    "dppo_kl",
    "geo_mean",
    "kl_cov",
    "clip_cov",
)
"""verl's own loss modes that drgrpo has a ``verl.<mode>`` twin of: those twins aggregate with ``loss_agg_mode``."""

VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""verl 0.9.1's ``loss_agg_mode`` values (``verl.trainer.ppo.core_algos.agg_loss``)."""


def follows_loss_agg_mode(preset: str) -> bool:
    """True for the twins of verl's own loss modes (``verl.vanilla``, ...), which aggregate as ``loss_agg_mode``
    says; every other preset (``dr_grpo``, ``verl.dr_grpo``, ...) has its own aggregation."""
    return preset.startswith("verl.") and preset.removeprefix("verl.") in VERL_LOSS_MODES


def loss_config(preset: str, actor: Mapping[str, Any], loss_agg_mode: str | None = None) -> LossConfig:
    """The preset with verl's overlapping settings applied (the module docstring's table), ``beta = 0``.

    Args:
        preset: a drgrpo preset name, e.g. ``"dr_grpo"``.
        actor: verl's actor config (``ActorConfig`` or an omegaconf ``DictConfig``; read with ``.get``).
        loss_agg_mode: the aggregation verl passes to the policy loss (default: ``actor.loss_agg_mode``, verl's
            own default ``"token-mean"``). A twin of a verl loss mode (:func:`follows_loss_agg_mode`) takes it as
            its aggregation; any other preset must already aggregate that way.

    Raises:
        ValueError: a ``loss_agg_mode`` that contradicts the preset's aggregation (both named), a preset that
            divides by a constant L with ``loss_scale_factor`` unset, or a verl setting that is not a valid value
            of the drgrpo field it maps to (both named).
    """
    base = preset_config(preset)
    mode = LOSS_PREFIX + preset
    agg_mode = actor.get("loss_agg_mode", "token-mean") if loss_agg_mode is None else loss_agg_mode
    if agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {', '.join(VERL_AGG_MODES)} (verl 0.9.1's); got {agg_mode!r}")

    def clip(field: str) -> tuple[str, Any]:
        value = actor.get(field)
        return (field, value) if value is not None else ("clip_ratio", actor.get("clip_ratio"))

    # drgrpo field -> (the verl setting it comes from, its value)
    mapped: dict[str, tuple[str, Any]] = {
        "clip_low": clip("clip_ratio_low"),
        "clip_high": clip("clip_ratio_high"),
    }
    dual_clip: dict[str, tuple[str, Any]] = {}
    for member in SURROGATES:  # every surrogate's own settings (sapo's tau_pos/neg are read for every preset)
        for setting, field in member.peer_fields.get("verl", {}).items():
            if field != "dual_clip":
                mapped.setdefault(field, (setting, _setting(actor, setting, getattr(base, field))))
            elif base.surrogate == member.name and base.ratio_level == "token":
                dual_clip[field] = (setting, actor.get(setting))  # verl's vanilla applies clip_ratio_c (null: off)
    mapped.update(dual_clip)  # gspo, cispo, sapo do not
    if actor.get("loss_scale_factor") is not None:
        mapped["max_completion_length"] = ("loss_scale_factor", actor.get("loss_scale_factor"))
    if follows_loss_agg_mode(preset):
        mapped["aggregation"] = ("loss_agg_mode", agg_mode)  # verl's sapo still forces seq-mean-token-mean
        aggregation = base.forced_aggregation or agg_mode
    elif agg_mode != base.effective_aggregation:
        raise ValueError(
            f"loss_mode {mode} aggregates with {base.effective_aggregation!r}, but "
            f"actor_rollout_ref.actor.loss_agg_mode is {agg_mode!r}: set loss_agg_mode={base.effective_aggregation} "
            "(verl's KL and entropy terms then have the loss's weights), or use a drgrpo.verl.<mode> loss, which "
            "follows loss_agg_mode"
        )
    else:
        aggregation = base.effective_aggregation
    if aggregation in _NEEDS_L and "max_completion_length" not in mapped and base.max_completion_length is None:
        raise ValueError(
            f"loss_mode {mode} ({aggregation}) divides by a constant L, and "
            "actor_rollout_ref.actor.loss_scale_factor is not set: set it to the generation budget (e.g. "
            "data.max_response_length). verl's own default, the padded width of each micro-batch, changes "
            "with the padding and is not used"
        )
    overrides = {field: value for field, (_, value) in mapped.items()}
    try:
        # beta = 0: the KL term is verl's (use_kl_loss), added outside the policy loss
        config = base.replace(beta=0.0, **overrides)
    except (TypeError, ValueError) as err:
        settings = ", ".join(f"{verl}={value!r} -> {field}" for field, (verl, value) in mapped.items())
        raise ValueError(f"verl actor config for loss_mode {mode} ({settings}): {err}") from err
    if config.surrogate == "dro" and config.dro_beta is None:
        raise ValueError(
            f"loss_mode {mode} needs actor_rollout_ref.actor.policy_loss.dro_beta (a positive number); it is not set"
        )
    return config


def _setting(actor: Mapping[str, Any], path: str, default: Any) -> Any:
    """verl's setting ``path`` of the actor config (``policy_loss.dro_beta`` reads a nested one), or ``default``."""
    node: Any = actor
    for key in path.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key, default) if key == path.split(".")[-1] else node.get(key)
    return node


def step_normalizer(batch_info: Mapping[str, Any] | None, config: LossConfig) -> StepNormalizer:
    """The step normaliser from verl's ``global_batch_info`` (one PPO mini-batch, all data-parallel ranks).

    ``num_tokens = batch_num_tokens`` (real tokens, all-reduced over the ranks), ``num_sequences =
    global_batch_size`` (completions), ``world_size = dp_size`` (FSDP averages the ranks' gradients), L =
    ``config.max_completion_length``. Raises a ValueError naming every missing field: verl's own losses fall
    back to per-micro-batch counts there, a different objective.
    """
    info = {} if batch_info is None else batch_info
    missing = [k for k in REQUIRED_BATCH_INFO if info.get(k) is None]
    if missing:
        raise ValueError(
            f"verl's config.global_batch_info has no {', '.join(missing)} (got {dict(info)!r}): drgrpo's losses "
            "normalise by the whole mini-batch's counts and never fall back to one micro-batch's. Call the loss "
            "through verl's actor (verl.workers.utils.losses.ppo_loss), which fills them"
        )
    dp_size = info["dp_size"]
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"global_batch_info['dp_size'] must be an int >= 1, got {dp_size!r}")
    # an all-padding mini-batch has weight 0 everywhere; clamping its count keeps 0 / 0 out
    num_tokens = _count("batch_num_tokens", info["batch_num_tokens"])
    num_sequences = _count("global_batch_size", info["global_batch_size"])
    return StepNormalizer(
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        max_completion_length=config.max_completion_length,
        world_size=dp_size,
    )


def _count(name: str, value: Any) -> Tensor | int:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"global_batch_info[{name!r}] must be a number, got a tensor of shape {tuple(value.shape)}"
            )
        return value.reshape(()).clamp_min(1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"global_batch_info[{name!r}] must be an int >= 0, got {value!r}")
    return max(value, 1)


def completion_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """verl's ``(B, T)`` advantages as drgrpo's ``(B,)``: the value on each completion's real tokens.

    verl broadcasts an outcome advantage to every token of a completion (``adv_estimator=grpo``, ``rloo``,
    ...); a per-token estimator (``gae``) gives values that vary along a completion, which the presets do
    not define: a ValueError says so. Reads the data (one device sync), as verl's own losses do.
    """
    real = mask.bool()
    first = real.to(torch.int32).argmax(-1, keepdim=True)  # (B, 1): first real token (0 for an empty row)
    per_row = advantages.gather(-1, first).squeeze(-1) * real.any(-1)  # (B,)
    deviation = torch.where(real, (advantages - per_row.unsqueeze(-1)).abs(), 0.0)  # padding may hold anything
    spread = deviation.amax() if deviation.numel() else deviation.sum()
    if bool(spread > 0):
        raise ValueError(
            "drgrpo's presets take one advantage per completion (an outcome estimator such as "
            f"algorithm.adv_estimator=grpo), but verl's advantages vary along a completion (by up to {float(spread)})"
        )
    return per_row


def make_policy_loss(preset: str) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """verl's policy-loss function for ``preset`` (see the module docstring for what it computes)."""

    def policy_loss_fn(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """drgrpo preset ``{preset}`` as a verl policy loss: ``(B, T)`` inputs, ``(pg_loss, metrics)`` out.

        ``loss_agg_mode`` is the aggregation of a ``verl.<mode>`` twin, and must equal any other preset's;
        ``config`` is verl's actor config.
        """
        if config is None:
            raise ValueError(f"loss_mode {LOSS_PREFIX}{preset} needs verl's actor config (config=None was passed)")
        cfg = loss_config(preset, config, loss_agg_mode)
        # verl's geo_mean averages over the call's own completions: its twin keeps that (per call)
        norm = None if cfg.per_call_normalization else step_normalizer(config.get("global_batch_info"), cfg)
        mask = response_mask
        adv = completion_advantages(advantages, mask)  # (B,)
        validate_inputs(log_prob, old_log_prob, adv, mask, cfg, None)
        terms = per_token_loss(log_prob, old_log_prob, adv, mask, cfg)  # (B, T), 0 on padding
        weights = token_weights(mask.to(terms.loss.dtype), cfg, norm)  # (B, T): the step's denominators
        if rollout_is_weights is not None:
            rho = rollout_is_weights.to(weights.dtype)  # verl's rollout correction, per token
            if cfg.surrogate == "geo_mean":  # per completion: the geometric mean of its tokens' weights, as verl's
                m = mask.to(rho.dtype)
                rho = (rho.log() * m).sum(-1, keepdim=True).div(m.sum(-1, keepdim=True).clamp_min(1)).exp()
            weights = weights * rho
        pg_loss = (terms.loss * weights).sum()
        return pg_loss, _verl_metrics(terms, adv, mask, log_prob, old_log_prob, cfg)

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"drgrpo_{preset.replace('.', '_')}"
    policy_loss_fn.__doc__ = (policy_loss_fn.__doc__ or "").replace("{preset}", preset)
    policy_loss_fn.drgrpo_preset = preset  # type: ignore[attr-defined]
    return policy_loss_fn


BYPASS_MODE = LOSS_PREFIX + "verl.bypass_mode"
"""The twin of verl's ``bypass_mode`` (old log-probs are the rollout's), a dispatch over two twins."""


def make_bypass_loss() -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    r"""verl's ``bypass_mode`` as drgrpo twins: ``policy_loss.rollout_correction.loss_type`` picks the loss.

    ``ppo_clip``: ``drgrpo.verl.vanilla`` with no IS weights (the ratio to the rollout policy is the correction).
    ``reinforce``: ``drgrpo.verl.gpg``, ``-A logp``, times the truncated IS weights ``w = min(rho, threshold)``
    (detached) with ``rho = exp(logp - old)`` per token (``rollout_is="token"``) or ``exp(sum_t (logp - old))`` per
    completion (``"sequence"``); ``rollout_is`` null: no weights. verl's ``rollout_is_weights`` argument is ignored,
    as verl's bypass_mode ignores it. Refused with a ValueError: rejection sampling (``rollout_rs``), batch
    normalisation of the weights and IcePop's ``"lower_upper"`` thresholds.
    """
    vanilla, reinforce = make_policy_loss("verl.vanilla"), make_policy_loss("verl.gpg")

    def policy_loss_fn(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        del rollout_is_weights  # computed here from old_log_prob (the rollout's), as verl's bypass_mode does
        settings = None if config is None else _setting(config, "policy_loss.rollout_correction", None)
        if settings is None:
            raise ValueError(f"loss_mode {BYPASS_MODE} needs actor_rollout_ref.actor.policy_loss.rollout_correction")
        where = "actor_rollout_ref.actor.policy_loss.rollout_correction"
        for key, off in (("rollout_rs", None), ("rollout_is_batch_normalize", False)):
            if settings.get(key, off) not in (off,):
                raise ValueError(f"loss_mode {BYPASS_MODE} does not implement {where}.{key}={settings.get(key)!r}")
        loss_type = settings.get("loss_type", "ppo_clip")
        if loss_type == "ppo_clip":
            return vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, None)
        if loss_type != "reinforce":
            raise ValueError(f"{where}.loss_type must be 'ppo_clip' or 'reinforce', got {loss_type!r}")
        level, threshold = settings.get("rollout_is", None), settings.get("rollout_is_threshold", 2.0)
        weights = None
        if level is not None and threshold is not None:
            if isinstance(threshold, str) and "_" in threshold:
                raise ValueError(f"loss_mode {BYPASS_MODE} does not implement IcePop thresholds ({threshold!r})")
            if level not in ("token", "sequence"):
                raise ValueError(f"{where}.rollout_is must be 'token', 'sequence' or null, got {level!r}")
            with torch.no_grad():
                m = response_mask.to(log_prob.dtype)
                log_rho = (log_prob - old_log_prob) * m  # (B, T)
                if level == "sequence":
                    log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho)
                weights = log_rho.exp().clamp(max=float(threshold)) * m
        return reinforce(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, weights)

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = "drgrpo_verl_bypass_mode"
    policy_loss_fn.drgrpo_preset = "verl.bypass_mode"  # type: ignore[attr-defined]
    return policy_loss_fn


def _verl_metrics(
    terms: PerTokenLoss, adv: Tensor, mask: Tensor, logp: Tensor, old: Tensor, cfg: LossConfig
) -> dict[str, Any]:
    """verl's metric names (floats, as verl's losses return them) plus drgrpo's clip fractions."""
    ours = loss_metrics(terms, mask)
    with torch.no_grad():
        m = mask.to(terms.ratio.dtype)
        denom = m.sum().clamp_min(1)
        neg_log_ratio = torch.where(mask.bool(), old.to(m.dtype) - logp.detach().to(m.dtype), 0.0)
        ppo_kl = neg_log_ratio.sum() / denom  # verl: the mean of -log r over real tokens
        dual = torch.zeros_like(denom)
        if cfg.dual_clip is not None:  # verl: the fraction of A < 0 tokens whose loss the dual clip caps
            clipped = terms.ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.clip_high)
            capped = (torch.maximum(terms.ratio, clipped) > cfg.dual_clip) & (adv.unsqueeze(-1) < 0)
            dual = (capped.to(m.dtype) * m).sum() / denom
    return {
        "actor/pg_clipfrac": float(ours["clip_frac_low"] + ours["clip_frac_high"]),
        "actor/ppo_kl": float(ppo_kl),
        "actor/pg_clipfrac_lower": float(dual),
        "actor/drgrpo_clip_frac_low": float(ours["clip_frac_low"]),
        "actor/drgrpo_clip_frac_high": float(ours["clip_frac_high"]),
    }


def register_losses(names: Iterable[str] | None = None) -> list[str]:
    """Register ``drgrpo.<name>`` in verl's policy-loss registry for each preset (default: every preset that
    is not defined per micro-batch); returns the loss modes registered.

    Call it again after registering presets of your own (in a ``verl.plugins`` entry point of yours, so
    every worker runs it). A name verl already holds for another function raises a ValueError (verl's own
    registry would silently replace it).
    """

    def step_wide(name: str) -> bool:  # or a twin of a verl mode that is per call in verl too (geo_mean)
        return not preset_config(name).per_call_normalization or follows_loss_agg_mode(name)

    chosen = [n for n in preset_names() if step_wide(n)] if names is None else names
    registered = []
    for name in chosen:
        if not step_wide(name):
            raise ValueError(f"preset {name!r} is defined per micro-batch and has no step-wide form for verl")
        mode = LOSS_PREFIX + name
        held = POLICY_LOSS_REGISTRY.get(mode)
        if held is not None and getattr(held, "drgrpo_preset", None) != name:
            raise ValueError(f"verl already has a policy loss {mode!r} ({held!r}); not replacing it")
        register_policy_loss(mode)(make_policy_loss(name))
        registered.append(mode)
    return registered


def make_advantage_estimator(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """verl's advantage-estimator function for drgrpo's estimator ``name`` (:func:`drgrpo.outcome_advantages`).

    verl calls it as ``fn(token_level_rewards=(B, T), response_mask=(B, T), config=algorithm, index=uids)``;
    the reward of completion i is the sum of its row, its length the row's mask sum, its group the rows with the
    same ``index`` (any order; every group must have the same size). ``norm_adv_by_std_in_grpo`` (an argument,
    else ``config``'s, default True) chooses the std of ``grpo`` and ``grpo_passk``; ``epsilon`` (1e-6) is added to
    it. Returns ``(advantages, returns)``, both the ``(B,)`` advantages broadcast over the real tokens.
    """
    if name not in OUTCOME_ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; drgrpo has {', '.join(OUTCOME_ESTIMATORS)}")

    def estimator(
        token_level_rewards: Tensor,
        response_mask: Tensor,
        index: Any = None,
        epsilon: float = 1e-6,
        norm_adv_by_std_in_grpo: bool | None = None,
        config: Any = None,
        **_: Any,
    ) -> tuple[Tensor, Tensor]:
        if index is None:
            raise ValueError(
                f"adv_estimator {LOSS_PREFIX}{name} groups completions by prompt: verl passed no index (uid)"
            )
        norm = norm_adv_by_std_in_grpo
        if norm is None:
            norm = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
        order, group_size = _group_order(index, name)
        rewards = token_level_rewards.sum(-1)[order]  # (B,) groups contiguous
        lengths = response_mask.sum(-1)[order]
        cfg = LossConfig(
            advantage_std="group" if norm else "none", std_unbiased=True, std_eps=epsilon, singleton_advantage="reward"
        )
        with torch.no_grad():
            grouped = outcome_advantages(rewards, group_size, cfg, name, lengths=lengths)  # (B,)
            adv = torch.empty_like(grouped).index_put_((order,), grouped)
            scores = adv.unsqueeze(-1) * response_mask
        return scores, scores

    estimator.__name__ = estimator.__qualname__ = f"drgrpo_{name}_advantage"
    estimator.drgrpo_estimator = name  # type: ignore[attr-defined]
    return estimator


def _group_order(index: Any, name: str) -> tuple[Tensor, int]:
    """Row order that makes verl's groups (equal ``index`` values) contiguous, and the common group size."""
    members: dict[Any, list[int]] = {}
    for row, uid in enumerate(list(index)):
        members.setdefault(uid, []).append(row)
    sizes = sorted({len(rows) for rows in members.values()})
    if len(sizes) != 1:
        raise ValueError(
            f"adv_estimator {LOSS_PREFIX}{name} needs every prompt to have the same number of completions; "
            f"got group sizes {sizes}"
        )
    order = torch.tensor([row for rows in members.values() for row in rows], dtype=torch.long)
    return order, sizes[0]


def register_estimators() -> list[str]:
    """Register ``drgrpo.<name>`` in verl's advantage-estimator registry for each outcome estimator; returns them.

    Chosen with ``algorithm.adv_estimator=drgrpo.<name>``. A name verl already holds for another function raises
    a ValueError.
    """
    registered = []
    for name in OUTCOME_ESTIMATORS:
        key = LOSS_PREFIX + name
        held = ADV_ESTIMATOR_REGISTRY.get(key)
        if held is not None and getattr(held, "drgrpo_estimator", None) != name:
            raise ValueError(f"verl already has an advantage estimator {key!r} ({held!r}); not replacing it")
        fn = make_advantage_estimator(name)
        if held is None:
            register_adv_est(key)(fn)
        else:
            ADV_ESTIMATOR_REGISTRY[key] = fn  # our own, registered again (verl's decorator refuses a new object)
        registered.append(key)
    return registered


def register_bypass_mode() -> str:
    """Register :func:`make_bypass_loss` as ``drgrpo.verl.bypass_mode`` (a name held by another function raises)."""
    held = POLICY_LOSS_REGISTRY.get(BYPASS_MODE)
    if held is not None and getattr(held, "drgrpo_preset", None) != "verl.bypass_mode":
        raise ValueError(f"verl already has a policy loss {BYPASS_MODE!r} ({held!r}); not replacing it")
    register_policy_loss(BYPASS_MODE)(make_bypass_loss())
    return BYPASS_MODE


REGISTERED: list[str] = [*register_losses(), register_bypass_mode()]
"""The loss modes registered when verl imported this module."""

REGISTERED_ESTIMATORS: list[str] = register_estimators()
"""The advantage estimators registered when verl imported this module."""
