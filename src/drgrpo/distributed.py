r"""``torch.distributed`` helpers: sums across processes and group advantages with global statistics.

Everything here degrades to the single-process computation when no process group is
initialised, so the same code runs under ``python train.py`` and ``torchrun``.

Advantages across processes. A group's mean (and its std, for ``advantage_std="group"``) only
needs the group's own G rewards, so as long as every group is whole on one process the local
computation is already the global one: the sampler must shard by prompt, giving each process
all G completions of its prompts as a contiguous block. Only ``advantage_std="batch"`` reads
the whole batch; :func:`global_group_advantages` then computes the batch std from
all-reduced statistics (two passes: count and sum, then the sum of squared deviations from the
global mean, which is numerically stable where a one-pass sum of squares is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from drgrpo.advantages import group_advantages, outcome_advantages
from drgrpo.config import LossConfig


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def distributed_world_size(group: Any = None) -> int:
    """Processes in ``group`` (``None``: the default group); 1 without an initialised process group."""
    return torch.distributed.get_world_size(group) if is_distributed() else 1


def any_process(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is true on any process (one all_reduce; ``flag`` itself on one process)."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """``x`` summed over the processes of ``group`` (a new tensor; ``x`` unchanged); ``x`` itself on one process."""
    if not is_distributed():
        return x
    out = x.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
    return out


def global_group_advantages(
    rewards: Tensor | Sequence[float],
    group_size: int,
    config: LossConfig,
    *,
    group: Any = None,
) -> Tensor:
    """:func:`drgrpo.group_advantages` of this process's rewards, with batch statistics over all processes.

    Equal to ``group_advantages`` of all processes' rewards concatenated, restricted to this
    process's rows, provided every group is whole on its process (validated: this process's
    number of rewards must be a multiple of ``group_size``).

    Args:
        rewards: ``(N_p,)`` this process's rewards, whole groups of ``group_size`` in contiguous blocks.
        group_size: G, completions per prompt.
        config: the advantage fields of a :class:`~drgrpo.config.LossConfig`.
        group: the ``torch.distributed`` process group (``None``: the default group).

    Returns:
        ``(N_p,)`` advantages, same dtype and device as ``rewards``.

    Raises:
        ValueError: when a process's rewards do not form whole groups, or hold NaN/inf where the
            config does not allow it. Under ``advantage_std="batch"`` the check is collective:
            every process raises, instead of one raising while the others wait in the all-reduce.
    """
    r = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    rank, size = (torch.distributed.get_rank(group), distributed_world_size(group)) if is_distributed() else (0, 1)
    problem = _local_problem(r, group_size, config, rank, size)
    if config.advantage_std != "batch" or not is_distributed():
        # group / none: each group's statistics are its own, and the group is whole here.
        if problem is not None:
            raise ValueError(problem)
        return group_advantages(r, group_size, config)

    # Pass 1: [valid rewards, their sum, processes with a problem] over all processes.
    valid = ~torch.isnan(r) if problem is None else torch.zeros_like(r, dtype=torch.bool)
    values = torch.where(valid, r, 0.0)
    flag = torch.tensor(float(problem is not None), dtype=r.dtype, device=r.device)
    stats = torch.stack([valid.sum().to(r.dtype), values.sum(), flag])
    count, total, bad = all_reduce_sum(stats, group).unbind()
    if problem is not None:
        raise ValueError(problem)
    if bool(bad > 0):  # a sync, but one the collective error path needs
        raise ValueError(
            f"global_group_advantages: {int(bad)} other process(es) of {size} passed invalid rewards "
            "(see their error); every process raised so that none waits forever in the all-reduce"
        )
    # Pass 2: sum of squared deviations from the global mean.
    mean = total / count.clamp_min(1)
    deviation = torch.where(valid, r - mean, 0.0)
    sq = all_reduce_sum((deviation * deviation).sum(), group)
    ddof = 1 if config.std_unbiased else 0
    var = sq / (count - ddof).clamp_min(1)
    batch_std = torch.where(count > ddof, var.sqrt(), torch.zeros_like(var))
    return group_advantages(r, group_size, config, batch_std=batch_std)


def _local_problem(r: Tensor, group_size: int, config: LossConfig, rank: int, size: int) -> str | None:
    """What is wrong with this process's rewards, as an error message, or None."""
    where = f" on process {rank} of {size}" if size > 1 else ""
    if r.dim() != 1:
        return f"rewards must be 1-D (N,), got shape {tuple(r.shape)}{where}"
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        return f"group_size must be an int >= 1, got {group_size!r}"
    if r.shape[0] % group_size != 0:
        return (
            f"this process has {r.shape[0]} rewards{where}, not a multiple of group_size={group_size}: groups must "
            "be whole on a process (shard the batch by prompt, all G completions of a prompt on one process, "
            "contiguous), because a group's mean and std need all of its rewards"
        )
    bad = ~torch.isfinite(r) if config.nan_rewards == "error" else torch.isinf(r)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        return f"rewards has a non-finite value {r[first].item()} at position {first}{where}"
    return None


BATCH_WIDE: tuple[str, ...] = ("reinforce_plus_plus_baseline", "gpg")
"""The estimators whose advantage of one completion depends on other prompts' rewards (whole-batch statistics)."""


def global_outcome_advantages(
    rewards: Tensor, group_size: int, config: LossConfig, estimator: str, *, lengths: Tensor | None = None
) -> Tensor:
    """:func:`outcome_advantages` of this process's rows, with the statistics of all processes' rows.

    ``grpo`` is :func:`global_group_advantages`; the per-prompt estimators need only the
    process's own whole groups; :data:`BATCH_WIDE` ones gather every process's rewards and lengths (each process
    holds the same number of rows) and return this process's slice of the whole batch's advantages.
    """
    if estimator == "grpo":
        return global_group_advantages(rewards, group_size, config)
    if estimator not in BATCH_WIDE or not is_distributed():
        return outcome_advantages(rewards, group_size, config, estimator, lengths=lengths)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    n = rewards.shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=rewards.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([n], device=rewards.device))
    counts = [int(c) for c in sizes]  # rows per process (one sync)
    local = torch.zeros(2, max(counts), dtype=rewards.dtype, device=rewards.device)
    local[0, :n] = rewards
    if lengths is not None:
        local[1, :n] = lengths.to(rewards)
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local)
    whole = torch.cat([part[:, :c] for part, c in zip(parts, counts)], dim=1)  # (2, N_total), process order
    out = outcome_advantages(whole[0], group_size, config, estimator, lengths=None if lengths is None else whole[1])
    start = sum(counts[:rank])
    return out[start : start + n]
