"""Step and evaluation metrics: per-process sums, added across processes with one ``all_reduce``."""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_across_processes(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed elementwise over the processes (one float64 ``all_reduce``); unchanged on one process."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_or_none(total: float, count: float) -> float | None:
    """``total / count``, or None when nothing was counted (e.g. no incorrect completions this step)."""
    return total / count if count > 0 else None


def length_stats(lengths: list[float], correct: list[bool]) -> list[float]:
    """[sum len, n, sum len correct, n correct, sum len incorrect, n incorrect], to be summed across processes."""
    lc = [n for n, c in zip(lengths, correct, strict=True) if c]
    li = [n for n, c in zip(lengths, correct, strict=True) if not c]
    return [sum(lengths), len(lengths), sum(lc), len(lc), sum(li), len(li)]
