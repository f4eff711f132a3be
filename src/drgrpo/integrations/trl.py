r"""``DrGRPOTrainer``: TRL's ``GRPOTrainer`` with drgrpo's loss, advantages and step normaliser.

Everything TRL does for scale stays TRL's; three things become drgrpo's: the advantages
(:func:`drgrpo.group_advantages`, or another estimator of :func:`drgrpo.outcome_advantages`), each micro-batch's
loss (:func:`drgrpo.policy_loss`, or :func:`drgrpo.fused_policy_loss` with ``fused=True``, inside the wrapped
model's forward) and one
:class:`drgrpo.StepNormalizer` per optimizer step. This module holds the trainer subclass, the generation of a
whole accumulation window ahead and the logging; the settings policy lives in
:mod:`drgrpo.integrations.trl_settings`. Why the window is generated ahead, which side decides each setting, what
is refused and what is logged: docs/design.md, section 9.1; how to use it: docs/trl.md.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import _ForwardRedirection
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "drgrpo.integrations.trl needs TRL (and accelerate, transformers, datasets): from a clone of drgrpo, "
        "pip install -e '.[trl]' (or bash scripts/setup.sh train,trl)"
    ) from error

import torch
from packaging.version import Version
from torch import Tensor

from drgrpo.advantages import OUTCOME_ESTIMATORS, group_advantages, outcome_advantages
from drgrpo.config import LossConfig
from drgrpo.entropy import AdaptiveEntropyCoef, entropy_bonus, entropy_threshold, high_entropy_mask
from drgrpo.fused import fused_policy_loss
from drgrpo.loss import LossOutput, per_token_loss, policy_loss
from drgrpo.normalizer import StepNormalizer

__all__ = ["DRGRPO_LOSS_TYPE", "SUPPORTED_TRL", "DrGRPOTrainer", "main", "resolve_loss_config"]

SUPPORTED_TRL = (Version("1.16"), Version("1.17"))
"""The TRL versions this adapter is tested with, [low, high): it overrides private ``GRPOTrainer`` methods."""

if not SUPPORTED_TRL[0] <= Version(Version(trl.__version__).base_version) < SUPPORTED_TRL[1]:
    raise ImportError(
        f"drgrpo.integrations.trl is tested with trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]} and overrides private "
        f"GRPOTrainer methods; found trl {trl.__version__}: from a clone of drgrpo, pip install -e '.[trl]'"
    )

from drgrpo.integrations.trl_settings import (  # noqa: E402
    DRGRPO_LOSS_TYPE,
    resolve_loss_config,
    setting_hint,
    settings_warning,
)

logger = logging.getLogger(__name__)

_PER_FUNCTION = LossConfig(advantage_std="group", std_eps=1e-4, nan_rewards="ignore")
"""TRL's normalisation of each reward function's rewards in their group (``normalize_then_sum``)."""

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier")


# --------------------------------------------------------------------------- the accumulation window


@dataclass
class _Window:
    """One optimizer step: the K raw dataloader batches, then its micro-batches and their normaliser."""

    raw: list[Any]
    micro: list[dict[str, Any]] | None = None
    normalizer: StepNormalizer | None = None
    entropy_threshold: Tensor | None = None  # the high-entropy mask's threshold over the whole step (core presets)
    position: int = 0


def _loss_mask(inputs: dict[str, Any]) -> Tensor:
    """The tokens TRL trains on: completion tokens, minus tool outputs in multi-turn rollouts. ``(B, T)``."""
    mask = inputs["completion_mask"]
    return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]


# --------------------------------------------------------------------------- the trainer


class DrGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose advantages, loss and per-step normalisation are drgrpo's.

    Constructed exactly like ``trl.GRPOTrainer`` plus three keyword arguments:

    Args:
        loss_config: a :class:`~drgrpo.LossConfig` or a preset name (``"dr_grpo"``, ``"dapo"``, ``"grpo"``,
            ``"gspo"``, ``"trl.grpo"``, ``"verl.cispo"``, ... see :func:`drgrpo.preset_names`). For a named
            preset that divides by a constant L (``"dr_grpo"``), **L is** ``args.max_completion_length``.
            ``None``: the loss ``args`` describes (``loss_type`` and its fields), as stock TRL computes it.
        fused: compute the loss from the last hidden states and ``lm_head`` with
            :func:`drgrpo.fused_policy_loss` (no ``(B, T, V)`` logits, no TRL log-prob head; TRL's
            ``entropy`` metric comes from the same pass).
        advantage: the outcome advantage estimator (:data:`drgrpo.advantages.OUTCOME_ESTIMATORS`): ``"grpo"``, the
            loss config's group advantages; ``"rloo"``, ``"opo"``, ... :func:`drgrpo.outcome_advantages` of the
            total reward over TRL's whole generation batch (every process's completions), ``opo`` and
            ``reinforce_plus_plus_baseline`` weighting each completion by its trained-on token count.

    docs/trl.md lists what is exact, which TRL settings are read, aligned, refused or ignored.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        *trainer_args: Any,
        loss_config: LossConfig | str | None = None,
        fused: bool = False,
        advantage: str = "grpo",
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        if advantage not in OUTCOME_ESTIMATORS:
            raise ValueError(
                f"advantage must be one of {', '.join(OUTCOME_ESTIMATORS)}; got {advantage!r} "
                f"(e.g. {setting_hint('advantage', 'rloo')})"
            )
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-DrGRPO")
        elif not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a trl.GRPOConfig, got {type(args).__name__}")
        config, changes = resolve_loss_config(loss_config, args)
        if changes:
            message = settings_warning(config, changes, args)
            args = copy.copy(args)  # the caller's GRPOConfig is left as it was
            for name, value in changes.items():
                setattr(args, name, value)
            logger.warning(message)
        self.loss_config = config
        self.advantage = advantage
        if advantage != "grpo":  # the estimator's refusals of this config (grpo_passk and a batch std), up front
            group = args.num_generations or 2
            outcome_advantages(torch.arange(2.0 * group), group, config, advantage, lengths=torch.ones(2 * group))
        # the entropy bonus is added by the trainer (its coefficient moves with use_adaptive_entropy)
        self._call_config = config.replace(entropy_coef=0.0) if config.entropy_coef != 0 else config
        # TRL's per-micro-batch definitions of the entropy mask and bonus (trl.* presets, no loss_config)
        self._trl_definitions = (config.name or "").startswith("trl.")
        self.fused = fused
        # TRL's entropy controller state (entropy_coef, _last_world_entropy: the attributes TRL's __init__ sets and
        # its checkpoint file saves and restores) lives in drgrpo's controller, through the properties below
        self._entropy_controller = AdaptiveEntropyCoef(
            coef=args.entropy_coef,
            coef_min=args.entropy_coef_min,
            coef_max=args.entropy_coef_max,
            delta=args.entropy_coef_delta,
            target=args.entropy_target,
        )
        self._window: _Window | None = None
        self._rewards_per_func: Tensor | None = None
        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        self._check_runtime()
        self._forward_redirection = _ForwardRedirection()

    def _check_runtime(self) -> None:
        """Refusals that need the built trainer (accelerator, model)."""
        parallel = getattr(self.accelerator, "parallelism_config", None)
        if parallel is not None and (getattr(parallel, "tp_enabled", False) or getattr(parallel, "cp_enabled", False)):
            raise ValueError(
                "DrGRPOTrainer counts tokens per data-parallel process: tensor and context parallelism are not "
                "supported"
            )
        if self.fused:
            if self._entropy_bonus_enabled and self._trl_definitions and not self.loss_config.per_call_normalization:
                raise ValueError(
                    f"fused=True adds the entropy bonus with the step's token count, but {self.loss_config.name}'s "
                    "(TRL's) is each micro-batch's own mean: use "
                    f"{setting_hint('fused', False)}, or a per-call loss type (grpo, bnpo, dr_grpo, luspo)"
                )
            if self.aux_loss_enabled:
                raise ValueError(
                    f"fused=True does not add the MoE router loss: set {setting_hint('router_aux_loss_coef', 0)} or "
                    f"use {setting_hint('fused', False)}"
                )
            text_config = self._unwrapped_causal_lm().config.get_text_config()
            for name in _LOGIT_TRANSFORMS:
                value = getattr(text_config, name, None)
                if value is not None and value != 1.0:
                    raise ValueError(
                        f"fused=True computes log_softmax(h W^T / temperature); the model's config has {name}={value}, "
                        f"which changes the logits: use {setting_hint('fused', False)} (TRL's head applies it)"
                    )
            if getattr(text_config, "logits_scaling", None) is not None:
                raise ValueError(
                    f"fused=True does not apply the model's logits_scaling: use {setting_hint('fused', False)}"
                )

    # ----------------------------------------------------------------------- advantages

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Tensor:
        # (N_global, F): every process's rewards, one column per reward function (NaN: not scored).
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards
        return rewards

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        """TRL's rollout, with the advantages replaced by drgrpo's for ``loss_config``."""
        self._rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        per_func = self._rewards_per_func
        if per_func is None:
            raise RuntimeError("TRL's _generate_and_score_completions did not call _calculate_rewards")
        mode = self._mode()
        group = self.num_generations if mode == "train" else self.num_generations_eval
        lengths = None
        if self.advantage != "grpo":  # (N_global,) every process's trained-on token counts, in process order
            lengths = self.accelerator.gather(_loss_mask(output).sum(dim=1)).to(per_func.dtype)
        advantages = self._advantages(per_func, group, lengths)  # (N_global,) groups are contiguous
        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(output["advantages"].dtype)
        # the completions table shows these advantages, not TRL's
        logged = self._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        return output

    def _advantages(self, per_func: Tensor, group: int, lengths: Tensor | None = None) -> Tensor:
        """Advantages ``(N,)`` from every process's rewards ``(N, F)`` (NaN: not scored), groups of ``group``.

        The total reward is TRL's for ``multi_objective_aggregation``: ``sum_then_normalize``, the weighted sum;
        ``normalize_then_sum``, the weighted sum of each function's rewards normalised in their group
        (``(r - mean) / (std + 1e-4)``). A function returning None adds nothing; a completion no function scored is
        NaN, left out of the statistics and given advantage 0 (every config has ``nan_rewards="ignore"``). The
        advantages are then the config's :func:`drgrpo.group_advantages` of that total, except that a ``trl.*``
        preset with ``normalize_then_sum`` normalises over the whole batch, as TRL does there. Another
        ``advantage`` estimator is :func:`drgrpo.outcome_advantages` of the total reward, with ``lengths`` ``(N,)``
        (every completion must then be scored).
        """
        weights = self.reward_weights.to(per_func.device).unsqueeze(0)  # (1, F)
        unscored = torch.isnan(per_func).all(dim=1)  # (N,)
        config = self.loss_config
        if self.multi_objective_aggregation == "normalize_then_sum":
            columns = [group_advantages(per_func[:, k], group, _PER_FUNCTION) for k in range(per_func.shape[1])]
            rewards = (torch.stack(columns, dim=1) * weights).sum(dim=1).masked_fill(unscored, float("nan"))
            if self.advantage != "grpo":
                return self._estimated(rewards, group, lengths)
            if config.name is not None and config.name.startswith("trl."):  # TRL: one group, the whole batch
                return group_advantages(rewards, rewards.numel(), config.replace(advantage_std="group"))
            return group_advantages(rewards, group, config)
        rewards = (per_func * weights).nansum(dim=1).masked_fill(unscored, float("nan"))  # (N,)
        if self.advantage != "grpo":
            return self._estimated(rewards, group, lengths)
        return group_advantages(rewards, group, config)

    def _estimated(self, rewards: Tensor, group: int, lengths: Tensor | None) -> Tensor:
        """The ``advantage`` estimator's advantages ``(N,)`` of the total rewards ``(N,)`` (none may be NaN)."""
        unscored = torch.isnan(rewards)
        if bool(unscored.any()):
            raise ValueError(
                f"advantage={self.advantage!r} needs a reward for every completion, but {int(unscored.sum())} of "
                f"{rewards.numel()} were scored by no reward function (None): only "
                f"{setting_hint('advantage', 'grpo')} leaves unscored completions out"
            )
        return outcome_advantages(rewards, group, self.loss_config, self.advantage, lengths=lengths)

    # ----------------------------------------------------------------------- the accumulation window

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list[Any], Any]:
        """The Trainer fetches one optimizer step's raw batches here: they define the window."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window = _Window(raw=list(batch_samples))
        return batch_samples, num_items_in_batch

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """Training: this micro-step's slice of the window, built (and counted) at the window's first micro-step."""
        if self._mode() == "eval":
            return super()._prepare_inputs(generation_batch)
        window = self._window
        if window is None or window.position >= len(window.raw) or window.raw[window.position] is not generation_batch:
            raise RuntimeError(
                "DrGRPOTrainer: a training micro-step whose batch is not the next one of the accumulation window the "
                "Trainer fetched in get_batch_samples; the step's token counts cannot be known ahead, so the loss "
                "would not be the whole step's. Train through Trainer.train() (transformers 5.x training loop)"
            )
        if window.micro is None:
            window.micro = self._build_window(window.raw)
            window.normalizer = self._window_normalizer(window.micro)
            if self.loss_config.top_entropy_quantile < 1 and not self._trl_definitions:
                window.entropy_threshold = self._step_entropy_threshold(window.micro)
        inputs = window.micro[window.position]
        window.position += 1
        return inputs

    def _build_window(self, raw_batches: Sequence[Any]) -> list[dict[str, Any]]:
        """TRL's buffering, run ahead for every micro-step of the window (generating as TRL would, same weights)."""
        first = self._step
        micro = []
        try:
            for j, raw in enumerate(raw_batches):
                self._step = first + j  # TRL decides from its step counter whether to generate and which slice
                micro.append(super()._prepare_inputs(raw))
        finally:
            self._step = first
        return micro

    def _window_normalizer(self, micro: Sequence[dict[str, Any]]) -> StepNormalizer | None:
        """The step's counts over all micro-batches and processes (one all_reduce); None for per-call presets."""
        if self.loss_config.per_call_normalization:
            return None
        normalizer = StepNormalizer.from_masks([_loss_mask(m) for m in micro], self.loss_config)
        if normalizer.world_size != self.accelerator.num_processes:
            raise RuntimeError(
                f"the default process group has {normalizer.world_size} processes but accelerate trains on "
                f"{self.accelerator.num_processes}: the step's counts would be summed over the wrong processes"
            )
        return normalizer

    # ----------------------------------------------------------------------- the loss

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor:
        """drgrpo's loss of one micro-batch (its share of the optimizer step's loss, times P)."""
        if return_outputs:
            raise ValueError("DrGRPOTrainer does not support returning outputs")
        mode = self._mode()
        if mode == "train":
            assert self._window is not None  # _prepare_inputs checked it
            normalizer = self._window.normalizer
        else:  # evaluation: each batch is its own step
            normalizer = self._window_normalizer([inputs])
        threshold = self._window.entropy_threshold if mode == "train" and self._window is not None else None
        coef = self._applied_entropy_coef() if self._entropy_bonus_enabled else 0.0
        if self.fused:
            unwrapped = self.accelerator.unwrap_model(model)
            # the fused pass adds the bonus itself (its entropies have a gradient only inside it)
            config = self._call_config.replace(entropy_coef=coef) if coef else self._call_config
            # a tuple through the wrapper: DDP finds the loss tensor in it
            fused_loss, metrics, logp, entropy = self._forward_redirection(
                model, unwrapped, self._fused_loss, inputs, normalizer, threshold, config
            )
            out, aux_loss = LossOutput(loss=fused_loss, metrics=metrics, logp=logp), None
            if threshold is None and self.loss_config.top_entropy_quantile < 1 and entropy is not None:
                threshold = entropy_threshold(entropy, _loss_mask(inputs), self.loss_config.top_entropy_quantile)
        else:
            out, entropy, aux_loss, threshold = self._logits_path_loss(model, inputs, normalizer, threshold)
        loss = out.loss
        if self.loss_config.per_call_normalization and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps  # TRL's definition of per-call losses
        if self._entropy_bonus_enabled:  # TRL's entropy bonus (entropy_coef, use_adaptive_entropy)
            assert entropy is not None  # both paths compute it
            acting = _loss_mask(inputs).bool()
            if threshold is not None:  # the bonus acts on the tokens the mask keeps, as in TRL
                acting = high_entropy_mask(entropy, acting, threshold)
            if self.fused:  # already in the loss: TRL's policy_loss metric is the loss without it
                policy = out.loss.detach() + entropy_bonus(entropy, acting, coef, normalizer)
            else:
                policy = out.loss.detach()
                loss = loss - self._entropy_bonus(entropy, acting, normalizer, mode, coef)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            self._observe_entropy(entropy, acting, mode)
        if aux_loss is not None:  # MoE load balancing, scaled as TRL scales it
            scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / scale
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(mode, out, entropy, inputs)
        return loss

    def _entropy_bonus(
        self, entropy: Tensor, mask: Tensor, normalizer: StepNormalizer | None, mode: str, coef: float
    ) -> Tensor:
        r"""This micro-batch's share of ``c * H``, subtracted from the loss (logits path).

        ``H`` is the policy's mean entropy per completion token (``entropy`` ``(B, T)``, with its gradient) over the
        tokens ``mask`` (the high-entropy mask's, if on). For a ``trl.*`` preset (and without ``loss_config``) it is
        TRL's: each micro-batch's own mean divided by K. For the other presets it is
        :func:`drgrpo.entropy.entropy_bonus` with the step's counts, so the gradient does not depend on the split.
        """
        if normalizer is None or self._trl_definitions:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            return entropy_bonus(entropy, mask, coef) / accumulation
        return entropy_bonus(entropy, mask, coef, normalizer)

    @property
    def entropy_coef(self) -> float:
        """TRL's ``entropy_coef`` attribute (the coefficient after the last step): the controller's."""
        return self._entropy_controller.coef

    @entropy_coef.setter
    def entropy_coef(self, value: float) -> None:  # TRL's __init__ and checkpoint loading set it
        self._entropy_controller.coef = float(value)

    @property
    def _last_world_entropy(self) -> float:
        """TRL's ``_last_world_entropy`` (the last step's entropy over all processes; inf before the first)."""
        return self._entropy_controller.last_entropy

    @_last_world_entropy.setter
    def _last_world_entropy(self, value: float) -> None:
        self._entropy_controller.last_entropy = float(value)

    def _applied_entropy_coef(self) -> float:
        """``c`` for this step: ``entropy_coef``; with ``use_adaptive_entropy`` the controller's
        (:meth:`drgrpo.entropy.AdaptiveEntropyCoef.applied`: 0 until a step at or below ``entropy_target``)."""
        return self._entropy_controller.applied() if self.use_adaptive_entropy else float(self.entropy_coef)

    def _observe_entropy(self, entropy: Tensor, mask: Tensor, mode: str) -> None:
        """TRL's adaptive controller (:class:`drgrpo.entropy.AdaptiveEntropyCoef`): this micro-batch's entropies
        join the step's window; at the step's last micro-batch the window is reduced over the processes (one
        reduce) and the coefficient updated. ``entropy_coef`` is logged once per step."""
        if mode != "train":
            return
        if self.use_adaptive_entropy:
            controller = self._entropy_controller
            controller.observe(entropy, mask)
            if self.accelerator.sync_gradients:
                sums = self.accelerator.reduce(controller.window(), reduction="sum")
                controller.step(float(sums[0]), float(sums[1]))
        if self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _logits_path_loss(
        self, model: Any, inputs: dict[str, Any], normalizer: StepNormalizer | None, threshold: Tensor | None
    ) -> tuple[LossOutput, Tensor, Tensor | None, Tensor | None]:
        """Per-token log-probs from TRL's own head (chunked, with entropies), then :func:`drgrpo.policy_loss`."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        multimodal = {k: inputs.get(k) for k in _MULTIMODAL_KEYS}
        causal_lm = self._unwrapped_causal_lm()
        _unshard_fsdp2_head(causal_lm, causal_lm.get_output_embeddings())  # else TRL's head would take full_tensor()
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **multimodal,
        )
        if self.loss_config.top_entropy_quantile < 1 and threshold is None:  # TRL's: this micro-batch, all processes
            threshold = self._gathered_entropy_threshold([entropies[_loss_mask(inputs).bool()]])
        out = policy_loss(
            logp,  # (B, T)
            inputs.get("old_per_token_logps"),  # None: on-policy, ratio 1
            inputs["advantages"],  # (B,)
            _loss_mask(inputs),
            self._call_config,
            ref_logp=inputs.get("ref_per_token_logps"),
            sampling_logp=inputs.get("sampling_per_token_logps"),  # vLLM's, NaN where it could not score
            normalizer=normalizer,
            entropy=entropies,
            entropy_threshold=threshold,
        )
        out.logp = logp.detach()
        return out, entropies, aux_loss, threshold

    def _step_entropy_threshold(self, micro: Sequence[dict[str, Any]]) -> Tensor:
        """The high-entropy mask's threshold over every real token of the step, all processes (one no-grad forward
        per micro-batch, with the step's weights): the same mask for any split."""
        values = []
        with torch.no_grad():
            for inputs in micro:
                completion_ids = inputs["completion_ids"]
                _, entropies, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                    torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                    completion_ids.size(1),
                    compute_entropy=True,
                    **{k: inputs.get(k) for k in _MULTIMODAL_KEYS},
                )
                values.append(entropies[_loss_mask(inputs).bool()])
        return self._gathered_entropy_threshold(values)

    def _gathered_entropy_threshold(self, values: Sequence[Tensor]) -> Tensor:
        """:func:`drgrpo.entropy.entropy_threshold` of the real tokens' entropies ``values`` of every process."""
        local = torch.cat([v.detach().float() for v in values])
        sentinel = -1.0  # entropies are >= 0
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=sentinel))
        gathered = gathered[gathered != sentinel]
        return entropy_threshold(gathered, torch.ones_like(gathered), self.loss_config.top_entropy_quantile)

    def _fused_loss(
        self, inputs: dict[str, Any], normalizer: StepNormalizer | None, threshold: Tensor | None, config: LossConfig
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor | None]:
        """Hidden states of the completion positions, then :func:`drgrpo.fused_policy_loss` with ``lm_head``.

        Returns the loss, its metrics, the detached per-token log-probs and entropies (TRL's ``entropy``
        metric, from the same pass over the logit chunks).

        Runs inside the wrapped model's forward (``_ForwardRedirection``), so DDP prepares its backward and
        FSDP/ZeRO-3 gather the backbone's parameters as for a plain forward.
        """
        causal_lm = self._unwrapped_causal_lm()
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        t = completion_ids.size(1)
        model_inputs = {
            "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            "use_cache": False,
        }
        present = [key for key in _MULTIMODAL_KEYS if inputs.get(key) is not None]
        if present:
            raise ValueError(
                f"fused=True supports text-only models; this batch has {present}: use {setting_hint('fused', False)}"
            )
        with self.accelerator.autocast():
            hidden = causal_lm.base_model(**model_inputs).last_hidden_state  # (B, P + T, H)
        hidden = hidden[:, -t - 1 : -1]  # (B, T, H): position p predicts token p + 1
        lm_head = causal_lm.get_output_embeddings()
        _unshard_fsdp2_head(causal_lm, lm_head)
        weight, bias = lm_head.weight, lm_head.bias  # (V, H), (V,) or None
        hidden = hidden.to(weight.device)
        # The products run in the head's dtype (float32 master weights under autocast; bf16 for a bf16 model).
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            out = fused_policy_loss(
                hidden.to(weight.dtype),
                weight,
                completion_ids.to(weight.device),
                _loss_mask(inputs).to(weight.device),
                inputs["advantages"],
                config,
                old_logp=inputs.get("old_per_token_logps"),
                ref_logp=inputs.get("ref_per_token_logps"),
                sampling_logp=_to(inputs.get("sampling_per_token_logps"), weight.device),
                bias=bias,
                temperature=self.temperature,
                normalizer=normalizer,
                compute_entropy=True,
                entropy_threshold=threshold,  # None: this call's (TRL's on one process)
            )
        return out.loss, out.metrics, out.logp, out.entropy

    def _mode(self) -> str:
        """``"train"`` or ``"eval"``, as TRL decides it (the model's training flag)."""
        return "train" if getattr(self.model, "training", False) else "eval"

    def _unwrapped_causal_lm(self) -> Any:
        """The transformers causal LM under accelerate's and PEFT's wrappers."""
        model = self.accelerator.unwrap_model(self.model)
        get_base_model: Callable[[], Any] | None = getattr(model, "get_base_model", None)
        return get_base_model() if get_base_model is not None else model

    # ----------------------------------------------------------------------- metrics

    def _log_loss_metrics(self, mode: str, out: LossOutput, entropy: Tensor | None, inputs: dict[str, Any]) -> None:
        """The loss's metrics under TRL's names, with TRL's meanings (one reduce over the processes, and one gather
        for the PPO surrogate's per-completion extremes).

        A share is a token mean over all processes, except at sequence level (GSPO), where TRL counts
        completions: the share of all completions (empty ones included) whose ratio was clipped.
        """
        config = self.loss_config
        mask = _loss_mask(inputs)
        assert out.logp is not None  # both loss paths return it
        advantages = inputs["advantages"]
        with torch.no_grad():
            terms = per_token_loss(
                out.logp.detach(),
                inputs.get("old_per_token_logps"),
                advantages,
                mask,
                config,
                ref_logp=inputs.get("ref_per_token_logps"),
                sampling_logp=inputs.get("sampling_per_token_logps"),
            )
        m = mask.to(torch.float32)  # (B, T)
        tokens = m.sum()
        rows = m.new_tensor(float(m.shape[0]))
        sequence = config.ratio_level == "sequence"

        def share(flags: Tensor) -> tuple[Tensor, Tensor]:  # flags (B, T) bool, False on padding
            if sequence:  # one ratio per completion: TRL counts completions
                return flags.any(dim=-1).to(torch.float32).sum(), rows
            return flags.to(torch.float32).sum(), tokens

        def token_mean(x: Tensor) -> tuple[Tensor, Tensor]:
            return (x.detach().to(torch.float32) * m).sum(), tokens

        entries: dict[str, tuple[Tensor, Tensor]] = {"drgrpo/ratio_mean": token_mean(terms.ratio)}
        if config.beta != 0.0 and terms.kl is not None:  # TRL logs the KL term it adds: weighted by the ratio if so
            entries["kl"] = token_mean(terms.kl * terms.ratio if config.kl_importance_weight else terms.kl)
        if entropy is not None:
            entries["entropy"] = token_mean(entropy)
        if config.surrogate == "ppo":
            entries["clip_ratio/low_mean"] = share(terms.clipped_low)
            entries["clip_ratio/high_mean"] = share(terms.clipped_high)
            entries["clip_ratio/region_mean"] = share(terms.clipped_low | terms.clipped_high)
        elif config.surrogate == "cispo":
            # TRL: the weight was capped on a token whose advantage is positive (where the cap acts on the gradient)
            entries["cispo_clip_ratio"] = share(terms.clipped_high & (advantages > 0).unsqueeze(-1))
            if config.clip_low is not None:  # a lower clip of the weight (verl's CISPO): no TRL name
                entries["drgrpo/clip_frac_low"] = share(terms.clipped_low)
        elif config.surrogate == "vespo" and terms.sequence_weight is not None:
            # TRL: the Gamma weight phi(w_i) averaged over all completions of all processes (empty ones: phi = 1)
            entries["vespo/phi_seq_mean"] = (terms.sequence_weight.detach().to(torch.float32).sum(), rows)
        sums = torch.stack([value for value, _ in entries.values()] + [count for _, count in entries.values()])
        totals = self.accelerator.reduce(sums, reduction="sum")
        n = len(entries)
        metrics = self._metrics[mode]
        for name, total, count in zip(entries, totals[:n].tolist(), totals[n:].tolist()):
            metrics[name].append(total / max(count, 1.0))
        if config.surrogate == "ppo":
            low_min, high_max = self._completion_clip_extremes(terms.clipped_low, terms.clipped_high, m, sequence)
            metrics["clip_ratio/low_min"].append(low_min)
            metrics["clip_ratio/high_max"].append(high_max)

    def _completion_clip_extremes(self, low: Tensor, high: Tensor, m: Tensor, sequence: bool) -> tuple[float, float]:
        """TRL's ``clip_ratio/low_min`` and ``clip_ratio/high_max``: each completion's share of clipped tokens
        (at sequence level: 1 if its ratio was clipped, else 0), gathered over the processes; the smallest low share
        and the largest high share. At token level a completion with no tokens has no share and is left out (NaN if
        none has one)."""
        clipped = torch.stack([low, high], dim=-1).to(torch.float32)  # (B, T, 2)
        if sequence:
            shares = clipped.amax(dim=1)  # (B, 2)
        else:
            shares = (clipped * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, 2); 0 / 0 = NaN
        shares = self.accelerator.gather(shares)  # (P * B, 2)
        scored = shares[~torch.isnan(shares[:, 0])]
        if scored.numel() == 0:
            return float("nan"), float("nan")
        return float(scored[:, 0].min()), float(scored[:, 1].max())


# TRL's per-token log-prob call takes these from the micro-batch (multimodal models); None when absent.
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _to(x: Tensor | None, device: Any) -> Tensor | None:
    return None if x is None else x.to(device)


def _unshard_fsdp2_head(causal_lm: Any, lm_head: Any) -> None:
    """FSDP2: gather a sharded ``lm_head`` weight through the ``fully_shard`` group that owns it.

    Under FSDP2 a group's parameters are sharded DTensors outside its module's forward. The fused loss runs
    inside the root module's forward, after the backbone's, so their groups are gathered; but ``lm_head``'s own
    forward never runs, so a head with a group of its own that is freed after each forward (transformers'
    plan ``{"lm_head": "free_full_weight"}``) is still sharded here. The logits path calls this before the root's
    forward, where a head in the root's own group is still sharded too. ``unshard()`` makes the module hold the
    full weight: its gradient then lands in FSDP's unsharded parameter, which FSDP reduce-scatters (averages
    over the processes) after the backward like every group's. ``weight.full_tensor()``, which TRL 1.16's head
    takes, leaves each process the shard of its *own* gradient, never averaged (docs/sharded.md). Does nothing
    for other tensors.
    """
    weight = lm_head.weight
    if not _is_dtensor(weight):
        return
    from torch.distributed.fsdp import FSDPModule

    # the group of a parameter is that of the nearest fully_shard module at or above the module holding it: the
    # head's own, the tied embedding's, or an enclosing one such as the root's (before the root's forward, in
    # which a later unshard is then a no-op)
    modules = dict(causal_lm.named_modules())
    holders = [name for name, m in modules.items() if any(p is weight for p in m.parameters(recurse=False))]
    for name in holders:
        parts = name.split(".") if name else []
        enclosing = (modules[".".join(parts[:depth])] for depth in range(len(parts), -1, -1))
        group = next((m for m in enclosing if isinstance(m, FSDPModule)), None)
        if group is not None:
            group.unshard()
            break
    if _is_dtensor(lm_head.weight):
        raise ValueError(
            f"DrGRPOTrainer needs lm_head's full weight for the loss, but it is a DTensor (placements "
            f"{getattr(weight, 'placements', '?')}) that no fully_shard group holding lm_head (or the embedding tied "
            "to it) gathers; its gradient would not be averaged over the processes. Apply fully_shard to lm_head "
            "or to a module that contains it (the root, for instance)"
        )


def _is_dtensor(x: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(x, DTensor)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python -m drgrpo.integrations.trl``: ``trl grpo``'s command line, training with :class:`DrGRPOTrainer`.

    The arguments are ``trl grpo``'s plus ``loss_config``, ``fused`` and ``advantage``
    (:mod:`drgrpo.integrations.trl_cli`).
    """
    from drgrpo.integrations.trl_cli import main as cli_main

    return cli_main(argv, trainer_cls=DrGRPOTrainer, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
