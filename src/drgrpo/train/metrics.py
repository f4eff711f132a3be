"""Step and evaluation metrics: named per-process sums, added across processes with one ``all_reduce``,
and the run's ``metrics.jsonl`` (plus optional TensorBoard events).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from drgrpo.distributed import Processes
from drgrpo.train.rollout import Rollout
from drgrpo.train.update import AVERAGED, UpdateStats


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


def step_metrics(
    step: int,
    batch: Rollout,
    rewards: list[float],
    firsts: list[float],
    advantages: torch.Tensor,
    update: UpdateStats,
    config: Any,
    procs: Processes,
    has_reference: bool,
    *,
    seconds: float,
    elapsed: float,
) -> dict[str, Any]:
    """One step's metrics line, over the whole batch of all processes.

    ``rewards`` are the weighted totals, ``firsts`` the correctness reward (a completion is correct when it
    is >= 0.5); ``reward``, ``accuracy`` and the lengths are means over completions, the loss metrics
    (``clip_frac_*``, ``ratio_mean``, ``kl``) means over real tokens. ``loss`` is the step's objective.
    ``frac_groups_no_signal`` is the share of groups whose ``advantages`` (``(B,)``, as the loss got them) are
    all 0 (equal rewards, or differences the advantages' dtype cannot hold): 1.0 means the policy loss gave no
    gradient this step (a KL penalty still may).
    ``seconds`` is the step's wall time, ``elapsed`` the run's so far.
    """
    group_size = config.group_size
    local = {
        "reward": sum(rewards),
        "reward_sq": sum(r * r for r in rewards),
        "accuracy": sum(firsts),
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
        "accuracy": s["accuracy"] / n,
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


class MetricsLog:
    """``RUN/metrics.jsonl``, one JSON object per line, written by rank 0 (a no-op on other ranks).

    On resume from step ``k`` the lines of later steps (written after that checkpoint) are dropped
    first, so the file reads as one uninterrupted run; a run that does not resume starts the file anew.
    """

    def __init__(self, out_dir: Path, rank: int, resumed_at: int | None, tensorboard: bool = False) -> None:
        self.file = None
        self.writer = None
        if rank != 0:
            return
        path = out_dir / "metrics.jsonl"
        kept = []
        if resumed_at is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resumed_at]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a")  # noqa: SIM115  (closed by close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def __call__(self, line: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in line.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, line["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
