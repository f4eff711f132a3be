r"""The policy update of one RL step: log-probs, the loss per micro-batch, one optimizer step per epoch.

The step's B completions are split into micro-batches of ``micro_batch_size`` rows. For every
split-invariant preset (``dr_grpo``, ``grpo``, ``dapo``, ...) ONE :class:`~drgrpo.StepNormalizer`
holds the whole step's token and completion counts (all micro-batches, all processes), so each
micro-batch's loss is exactly its share of the step's objective and the accumulated gradient,
averaged by DDP, is the gradient of the whole batch's loss. For Dr. GRPO::

    grad = d/dtheta  sum_{i,t} A_i * l_{i,t} / (N_seq * L)        (l: the clipped surrogate per token)

Presets that their framework normalises per micro-batch (``trl.grpo``, ``trl.bnpo``,
``trl.dr_grpo``: ``per_call_normalization``) keep that definition, and like
their frameworks the trainer averages them over the K micro-batches (each loss divided by K), so
their gradient does not grow with K.

``fused=True`` computes the loss from the last hidden states and the output layer
(:func:`drgrpo.fused_policy_loss`) and the old and reference log-probs with
:func:`drgrpo.chunked_logprobs`: no ``(b, T, V)`` logits at any point of the step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from drgrpo.config import LossConfig
from drgrpo.fused import fused_policy_loss
from drgrpo.loss import LossOutput, policy_loss
from drgrpo.normalizer import StepNormalizer
from drgrpo.train.loop.rollout import Rollout, completion_hidden, completion_logp, output_layer, token_logp
from drgrpo.train.run.stopping import NO_STOP, Stop
from drgrpo.train.train_config import TrainConfig

AVERAGED = ("clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean")
"""Loss metrics averaged over the step's real tokens."""


@dataclass
class TrainState:
    """What a step changes, and which step's end it holds (the unit of a checkpoint)."""

    model: Any
    """The policy (a Hugging Face causal LM)."""
    policy: Any
    """The module that runs forward and backward: ``model``, or its DistributedDataParallel wrapper."""
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    ref_model: Any | None
    """The frozen reference policy (for beta * KL, or only to log the KL); None when not needed."""
    step: int | None
    """The step whose end the parameters and optimizer hold; None while an update is changing them."""


@dataclass
class UpdateStats:
    """What the update of one step reports (this process's share; summed across processes by the metrics)."""

    loss: float
    """The loss of the last epoch: the sum of this process's micro-batch losses."""
    grad_norm: float
    """Global gradient norm of the last epoch, before clipping."""
    lr: float
    """Learning rate of the last optimizer step."""
    token_sums: dict[str, float] = field(default_factory=dict)
    """For each of :data:`AVERAGED`, its mean times the real tokens, summed over micro-batches (last epoch)."""


def micro_batches(rows: int, size: int) -> list[slice]:
    """Consecutive row slices of at most ``size`` rows covering ``0 .. rows - 1``."""
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


def learning_rate(config: TrainConfig, optimizer_step: int) -> float:
    """``config.lr`` after a linear warm-up over ``config.warmup_steps`` optimizer steps (1-based)."""
    return config.lr * min(1.0, optimizer_step / config.warmup_steps) if config.warmup_steps else config.lr


def policy_update(
    state: TrainState,
    batch: Rollout,
    advantages: Tensor,
    loss_config: LossConfig,
    config: TrainConfig,
    step: int,
    stop: Stop = NO_STOP,
) -> UpdateStats:
    """``config.ppo_epochs`` optimizer steps on one rollout batch; sets ``state.step = step`` when done.

    Args:
        state: model, DDP wrapper, optimizer and reference model; ``state.step`` becomes None as soon as
            the first optimizer step starts changing the parameters.
        batch: this process's rollout, ``B`` completions in whole groups.
        advantages: ``(B,)`` one advantage per completion.
        loss_config: the resolved loss.
        config: the run's settings (micro_batch_size, ppo_epochs, lr, grad_clip,
            temperature, fused).
        step: the RL step (1-based), for the learning-rate schedule and error messages.
        stop: the run's signal handling: from the first optimizer step to the end, a signal waits
            (``stop.deferred()``), so the weights saved always hold a whole step.

    Raises:
        ValueError: for ``beta > 0`` without a reference model.
        FloatingPointError: when the gradient norm is not finite (checked before the optimizer step, on the
            gradients all processes share, so every process raises at the same point), or when the optimizer step
            made a weight non-finite (:func:`check_finite_weights`; ``state.step`` is then left None).
    """
    if loss_config.beta > 0 and state.ref_model is None:
        raise ValueError(f"loss beta={loss_config.beta} > 0 needs a reference model (state.ref_model is None)")
    micro = micro_batches(batch.completion_ids.shape[0], config.micro_batch_size)
    masks = [batch.completion_mask[s] for s in micro]
    per_call = loss_config.per_call_normalization
    # ONE normaliser for the step: global token and completion counts, all micro-batches, all processes
    normalizer = None if per_call else StepNormalizer.from_masks(masks, loss_config)
    scale = 1.0 / len(micro) if per_call else 1.0  # per-call presets: the mean over micro-batches
    # pi_old, the sampling policy: with one epoch it is the current policy (ratio 1, old_logp=None)
    old = [_logp_or_none(state.model, batch.rows(s), config, config.ppo_epochs > 1) for s in micro]
    ref = [_logp_or_none(state.ref_model, batch.rows(s), config, state.ref_model is not None) for s in micro]

    stats = UpdateStats(loss=0.0, grad_norm=0.0, lr=config.lr)
    with contextlib.ExitStack() as weights_changing:  # from the first optimizer step: signals wait for its end
        for epoch in range(config.ppo_epochs):
            state.optimizer.zero_grad(set_to_none=True)
            stats.loss, stats.token_sums = 0.0, dict.fromkeys(AVERAGED, 0.0)
            for k, s in enumerate(micro):
                last = k == len(micro) - 1
                # DDP all-reduces the gradients once per optimizer step, on the last micro-batch
                sync = (
                    contextlib.nullcontext() if last or not hasattr(state.policy, "no_sync") else state.policy.no_sync()
                )
                with sync:
                    out = micro_batch_loss(
                        state, batch.rows(s), old[k], ref[k], advantages[s], loss_config, normalizer, config
                    )
                    (out.loss * scale).backward()
                stats.loss += out.loss.item() * scale
                tokens = float(out.metrics["num_tokens"])
                for key in AVERAGED:
                    stats.token_sums[key] += float(out.metrics[key]) * tokens

            stats.lr = learning_rate(config, (step - 1) * config.ppo_epochs + epoch + 1)
            for group in state.optimizer.param_groups:
                group["lr"] = stats.lr
            clip = config.grad_clip if config.grad_clip > 0 else math.inf
            stats.grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip))
            if not math.isfinite(stats.grad_norm):
                raise FloatingPointError(
                    f"step {step}: the gradient norm is {stats.grad_norm} (loss {stats.loss}): the loss or the "
                    "log-probs are not finite, so the weights were not updated. Lower --lr or --grad-clip, or check "
                    "the rewards and the model's dtype"
                )
            state.step = None  # the parameters change from here until the step is complete
            if epoch == 0:
                weights_changing.enter_context(stop.deferred())
            state.optimizer.step()
            check_finite_weights(state.model, step, stats.grad_norm, config)  # never a non-finite checkpoint
        state.step = step  # a signal that came meanwhile stops the run at the next point it can (stopping.py)
    return stats


def check_finite_weights(model: Any, step: int, grad_norm: float, config: TrainConfig) -> None:
    """Raise FloatingPointError when an optimizer step left a NaN or an infinity in the weights.

    The largest magnitude of each parameter tensor (one multi-tensor ``_foreach_norm(ord=inf)``, as
    ``clip_grad_norm_`` uses; NaN and infinity reach it, a finite maximum never overflows), read once: a pass
    over the weights and one device sync per optimizer step (on a GPU the sync waits for the step to finish).
    ``state.step`` stays None on this error, so the failure path saves nothing of the step: the last checkpoint
    stays the last good one. Every process holds the same weights after a step, so all raise together.
    """
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    if not params or bool(torch.stack(torch._foreach_norm(params, math.inf)).isfinite().all()):
        return
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise FloatingPointError(
        f"step {step}: the optimizer step made the weights non-finite ({names}) from a finite gradient (norm "
        f"{grad_norm:.3g}): the learning rate is too large for the weights' dtype (--lr {config.lr}, --dtype "
        f"{config.dtype}); lower --lr, add --warmup-steps or train in float32. The weights of this step are not saved"
    )


def micro_batch_loss(
    state: TrainState,
    mb: Rollout,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    loss_config: LossConfig,
    normalizer: StepNormalizer | None,
    config: TrainConfig,
) -> LossOutput:
    """The loss of one micro-batch (its share of the step's objective), through ``state.policy``'s forward.

    Inputs are made by the trainer (shapes right by construction), so the data checks are skipped: a
    non-finite value reaches the gradient norm, which every process checks on the same reduced gradients.
    """
    if config.fused:
        hidden = completion_hidden(state.policy, mb)  # (b, T, H) through DDP's forward; no logits
        weight, bias = output_layer(state.model)  # (V, H), (V,) or None
        return fused_policy_loss(
            hidden,
            weight,
            mb.completion_ids,
            mb.completion_mask,
            advantages,
            loss_config,
            old_logp=old_logp,
            ref_logp=ref_logp,
            bias=bias,
            temperature=config.temperature,
            normalizer=normalizer,
            validate=False,
        )
    logp = token_logp(state.policy, mb, config.temperature)  # (b, T)
    return policy_loss(
        logp, old_logp, advantages, mb.completion_mask, loss_config, ref_logp=ref_logp, normalizer=normalizer,
        validate=False,
    )  # fmt: skip


def _logp_or_none(model: Any, mb: Rollout, config: TrainConfig, needed: bool) -> Tensor | None:
    return completion_logp(model, mb, config.temperature, config.fused) if needed else None
