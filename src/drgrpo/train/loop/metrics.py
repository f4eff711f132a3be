"""Step and evaluation metrics: named per-process sums, added across processes with one ``all_reduce``.

The file they are written to, ``metrics.jsonl``, is the run's: :mod:`drgrpo.train.run.metrics_log`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from drgrpo.train.loop.rollout import Rollout
from drgrpo.train.loop.update import AVERAGED, UpdateStats
from drgrpo.train.run.processes import Processes


def sum_across_processes(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """The named sums added over the processes (one float64 ``all_reduce``); unchanged on one process."""
    if not dist.is_initialized():
        return dict(sums)
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(sums, t.tolist(), strict=True))


def mean_or_none(total: float, count: float) -> float | None:
    """``total / count``, or None when nothing was counted (e.g. no incorrect completions this step)."""
    return total / count if count > 0 else None


def length_sums(lengths: list[float], correct: list[bool]) -> dict[str, float]:
    """Sums of completion lengths and counts, all, correct and incorrect (to be added across processes)."""
    right = [n for n, c in zip(lengths, correct, strict=True) if c]
    wrong = [n for n, c in zip(lengths, correct, strict=True) if not c]
    return {
        "length": float(sum(lengths)),
        "completions": float(len(lengths)),
        "length_correct": float(sum(right)),
        "num_correct": float(len(right)),
        "length_incorrect": float(sum(wrong)),
        "num_incorrect": float(len(wrong)),
    }


def correctness_sums(firsts: Sequence[float]) -> dict[str, float]:
    """Sums behind ``accuracy`` (to be added across processes): the first reward's values, and how many are
    neither 0 nor 1 (any such value means the first reward is no correctness reward)."""
    return {"accuracy": float(sum(firsts)), "not_0_or_1": float(sum(1 for r in firsts if r != 0.0 and r != 1.0))}


def accuracy_metrics(s: dict[str, float], first_reward: str, prefix: str = "") -> dict[str, float | None]:
    """``accuracy``: the share of completions the first reward scored 1, when it scored each 0 or 1 (a
    correctness reward, as the built-in exact match). Otherwise no accuracy (None) and the first reward's mean
    under its name, ``reward/NAME``: the mean of ``1e8 + correct`` is no accuracy.
    ``s``: the added :func:`correctness_sums` and ``completions``.
    """
    mean = mean_or_none(s["accuracy"], s["completions"])
    if s["not_0_or_1"] == 0:
        return {f"{prefix}accuracy": mean}
    return {f"{prefix}accuracy": None, f"{prefix}reward/{first_reward}": mean}


def step_metrics(
    step: int,
    batch: Rollout,
    rewards: list[float],
    firsts: list[float],
    advantages: torch.Tensor,
    update: UpdateStats,
    group_size: int,
    first_reward: str,
    procs: Processes,
    has_reference: bool,
    *,
    seconds: float,
    elapsed: float,
) -> dict[str, Any]:
    """One step's metrics line, over the whole batch of all processes.

    ``rewards`` are the weighted totals, ``firsts`` the first reward's values (a completion is correct when it
    is >= 0.5); ``reward``, ``accuracy`` (:func:`accuracy_metrics`) and the lengths are means over completions,
    the loss metrics (``clip_frac_*``, ``ratio_mean``, ``kl``) means over real tokens. ``loss`` is the step's objective.
    ``frac_groups_no_signal`` is the share of groups whose ``advantages`` (``(B,)``, as the loss got them) are
    all 0 (equal rewards, or differences the advantages' dtype cannot hold): 1.0 means the policy loss gave no
    gradient this step (a KL penalty still may).
    ``group_size`` is G (the completions of a prompt: consecutive rows), ``first_reward`` the name of the first
    reward (behind ``accuracy``); ``seconds`` is the step's wall time, ``elapsed`` the run's so far.
    """
    local = {
        "reward": sum(rewards),
        "reward_sq": sum(r * r for r in rewards),
        **correctness_sums(firsts),
        "flat_groups": float((advantages.view(-1, group_size) == 0).all(-1).sum()),  # no learning signal
        "truncated": float(batch.truncated.sum()),
        "loss": update.loss,
        **update.token_sums,
        **length_sums(batch.lengths.tolist(), [r >= 0.5 for r in firsts]),
    }
    s = sum_across_processes(local, procs.device)
    n, tokens = s["completions"], s["length"]
    mean_reward = s["reward"] / n
    token_means = {key: s[key] / tokens for key in AVERAGED}
    return {
        "step": step,
        "reward": mean_reward,
        "reward_std": math.sqrt(max(s["reward_sq"] / n - mean_reward**2, 0.0)),
        **accuracy_metrics(s, first_reward),
        "frac_groups_no_signal": s["flat_groups"] / (n / group_size),
        "loss": s["loss"] / procs.world,  # every process's share is world x its part (DDP averages the gradients)
        "length": tokens / n,
        "length_correct": mean_or_none(s["length_correct"], s["num_correct"]),
        "length_incorrect": mean_or_none(s["length_incorrect"], s["num_incorrect"]),
        "frac_truncated": s["truncated"] / n,
        "kl": token_means["kl_mean"] if has_reference else None,
        "clip_frac_low": token_means["clip_frac_low"],
        "clip_frac_high": token_means["clip_frac_high"],
        "ratio_mean": token_means["ratio_mean"],
        "grad_norm": update.grad_norm,
        "lr": update.lr,
        "tokens_per_s": tokens / seconds,
        "step_time": seconds,
        "time": elapsed,
    }
