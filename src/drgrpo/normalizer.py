r"""Global counts for one optimizer step, so that a split batch gives the whole batch's gradient.

:class:`StepNormalizer` holds the real-token and completion counts of a whole step (every micro-batch of every
process, summed with one ``all_reduce``) and the DDP averaging correction (``world_size``); passed as
``normalizer=`` to :func:`drgrpo.policy_loss`, each micro-batch's loss is exactly its share of the step's
objective. Why local counts optimise a different objective, and the correction: docs/design.md, section 9.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from drgrpo.config import LossConfig, check_constant_length
from drgrpo.distributed import all_reduce_sum, distributed_world_size


def check_step_normalizable(config: LossConfig, length: int | None) -> None:
    """Raise unless ``config`` can be normalised by one optimizer step's counts with the constant ``length``.

    Refused: presets defined per call (``per_call_normalization``), ``seq-mean-token-sum-norm`` without L, and
    ``token-sum-norm`` without L (it would divide by each call's padded width, which differs between calls).
    """
    if config.per_call_normalization:
        raise ValueError(
            f"preset {config.name!r} normalises per call (per micro-batch) by definition, so it has no "
            "step-wide normaliser; use the equivalent split-invariant core preset (e.g. 'dr_grpo', 'dapo')"
        )
    aggregation = config.effective_aggregation
    check_constant_length(aggregation, length)
    if aggregation == "token-sum-norm" and length is None:
        raise ValueError(
            "aggregation 'token-sum-norm' without max_completion_length divides by each call's padded width "
            "(verl's default L when loss_scale_factor is unset), which differs between micro-batches: that is "
            "per-call by definition. Set max_completion_length=L for a constant, split-invariant L"
        )


@dataclass(frozen=True)
class StepNormalizer:
    """The denominators of one optimizer step, summed over micro-batches and processes.

    Build it with :meth:`from_masks` once per optimizer step, before the first micro-batch, and
    pass the same object to every micro-batch's loss call of that step.
    """

    num_tokens: Tensor | float
    """Real (mask = 1) completion tokens in the whole step, all processes (a 0-dim tensor from :meth:`from_masks`)."""
    num_sequences: Tensor | float
    """Completions in the whole step, all processes (a 0-dim tensor from :meth:`from_masks`)."""
    max_completion_length: int | None = None
    """The constant L of seq-mean-token-sum-norm; None uses the config's."""
    world_size: int = 1
    """Processes whose gradients DDP averages; weights are multiplied by it to undo the average."""

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {self.world_size!r}")
        length = self.max_completion_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"max_completion_length must be None or an int >= 1, got {length!r}")
        for name in ("num_tokens", "num_sequences"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) and not value > 0:  # tensors are not read: no device sync
                raise ValueError(f"{name} must be > 0, got {value}")

    @classmethod
    def from_masks(
        cls,
        masks: Sequence[Tensor] | Tensor,
        config: LossConfig,
        *,
        group: object | None = None,
        ddp_average: bool = True,
    ) -> StepNormalizer:
        """The step's global counts from this process's micro-batch masks.

        Args:
            masks: this process's masks for ONE optimizer step, a list of ``(B_k, T_k)`` 0/1 tensors
                (bool, int or float; T may differ between micro-batches), or one ``(B, T)`` tensor.
            config: the loss config; its ``max_completion_length`` becomes the constant L.
            group: the ``torch.distributed`` process group to sum over (``None``: the default group).
                Without an initialised process group the counts are this process's alone.
            ddp_average: True when the gradients are averaged over the group's processes (DDP, FSDP):
                ``world_size`` is then the group size, undoing the average. False if they are summed.

        Returns:
            A :class:`StepNormalizer` whose counts are 0-dim int64 tensors on the masks' device
            (no ``.item()``: no device sync; the only communication is one ``all_reduce``). Every
            process must call this collectively, like any collective operation.

        Raises:
            ValueError: for a config that normalises per call (``per_call_normalization``, or
                ``token-sum-norm`` with the padded width as L), for ``seq-mean-token-sum-norm`` without L,
                or for masks that are not 2-D.
        """
        if not isinstance(config, LossConfig):
            raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
        check_step_normalizable(config, config.max_completion_length)
        mask_list = [masks] if isinstance(masks, Tensor) else list(masks)
        if not mask_list:
            raise ValueError("masks is empty: pass this process's micro-batch masks for the step, a list of (B_k, T_k)")
        device = mask_list[0].device
        for k, mask in enumerate(mask_list):
            if not isinstance(mask, Tensor):
                raise TypeError(f"masks[{k}] must be a torch.Tensor, got {type(mask).__name__}")
            if mask.dim() != 2:
                raise ValueError(f"masks[{k}] must be 2-D (B_k, T_k), got shape {tuple(mask.shape)}")
            if mask.device != device:
                raise ValueError(f"masks[{k}] is on {mask.device}, masks[0] on {device}: put them on one device")

        # (2,) int64 on the masks' device: [real tokens, completions]. Integers keep the counts exact.
        num_tokens = torch.stack([(m != 0).sum() for m in mask_list]).sum()
        num_sequences = torch.tensor(sum(m.shape[0] for m in mask_list), device=device)
        counts = torch.stack([num_tokens, num_sequences]).to(torch.int64)
        counts = all_reduce_sum(counts, group)  # the step's one collective (a no-op on one process)
        counts = counts.clamp_min(1)  # an all-padding step: weights 0, not 0/0
        world_size = distributed_world_size(group) if ddp_average else 1
        return cls(
            num_tokens=counts[0],
            num_sequences=counts[1],
            max_completion_length=config.max_completion_length,
            world_size=world_size,
        )
