"""Step and evaluation metrics: named per-process sums, added across processes with one ``all_reduce``,
and the run's ``metrics.jsonl`` (plus optional TensorBoard events).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from drgrpo.distributed import Processes
from drgrpo.train.loop.rollout import Rollout
from drgrpo.train.loop.update import AVERAGED, UpdateStats
from drgrpo.train.run.disk import write_error
from drgrpo.train.run.stopping import NO_STOP, Stop


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


METRICS_FILE = "metrics.jsonl"


def read_metrics_file(path: str | Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` (one JSON object per line, each with an integer ``step``).

    A last line without its newline that is not valid JSON is a write that did not finish (a full disk, a
    killed process, or a run writing it now): it is left out, and ``warn`` (default: print to stderr) gets one
    line naming the file and the last step kept. Any other bad line raises ValueError naming the file and line.
    """
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            if lineno == len(lines):  # the last line, without its newline: an unfinished write
                kept = f"up to step {rows[-1]['step']}" if rows else "none"
                (warn or warn_line)(
                    f"{path}: line {lineno} is cut off (a write that did not finish: a full disk, a killed run, or "
                    f"a run writing it now); it is left out, the lines kept go {kept}"
                )
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with an integer 'step', got {line[:80]!r}")
        rows.append(row)
    return rows


def warn_line(message: str) -> None:
    """A warning for people: one line on stderr."""
    print(f"drgrpo: warning: {message}", file=sys.stderr)


class MetricsLog:
    """``RUN/metrics.jsonl``, one JSON object per line, written by rank 0 (a no-op on other ranks).

    The file starts with ``start`` (the lines of the run so far: none for a new run; on resume from step ``k``
    the run's lines up to ``k``, so that the file reads as one uninterrupted run), written to a temporary file
    and renamed into place, so no line is lost to a kill meanwhile. A failed write raises
    :class:`~drgrpo.train.run.disk.WriteFailed` naming the file and the reason ("No space left on device"); signals
    wait for the end of a line (``stop.deferred()``, :class:`~drgrpo.train.run.stopping.Stop`).
    """

    def __init__(
        self,
        out_dir: Path,
        rank: int,
        start: Sequence[dict[str, Any]] = (),
        tensorboard: bool = False,
        stop: Stop = NO_STOP,
    ) -> None:
        self.stop = stop
        self.file = None
        self.writer = None
        self.path = out_dir / METRICS_FILE
        if rank != 0:
            return
        tmp = out_dir / f".{METRICS_FILE}.{os.getpid()}"
        try:
            tmp.write_text("".join(json.dumps(line) + "\n" for line in start))
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(str(self.path), exc, out_dir) from exc
        self.file = open(self.path, "a")  # noqa: SIM115  (closed by close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def __call__(self, line: dict[str, Any]) -> None:
        if self.file is not None:
            with self.stop.deferred():
                try:
                    self.file.write(json.dumps(line) + "\n")
                    self.file.flush()
                except OSError as exc:
                    raise write_error(str(self.path), exc, self.path.parent) from exc
        if self.writer is not None:
            for key, value in line.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, line["step"])

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # a failed write was reported already
                self.file.close()
        if self.writer is not None:
            self.writer.close()
