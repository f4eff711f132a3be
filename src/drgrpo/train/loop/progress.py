"""What a run shows while it trains (rank 0): a progress bar in a terminal, plain lines elsewhere.

In a terminal the bar redraws one line; written to a file or a pipe (a log, CI), a redrawn bar would come out
as its last frame, cut to an unknown width, so each step's figures are printed as a line of text instead
(every :data:`PLAIN_EVERY` steps and the last). How signals stop a run: :mod:`drgrpo.train.run.stopping`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

PLAIN_EVERY = 10
"""Outside a terminal, a line every this many steps (and at the last step)."""


def step_text(m: dict[str, Any], accuracy: float | None) -> str:
    """A step's figures in one line: reward, held-out accuracy, lengths of right and wrong completions, KL, speed."""

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    return (
        f"reward {f(m['reward'], '.2f')} acc {f(accuracy, '.2f')} "
        f"len right/wrong {f(m['length_correct'], '.1f')}/{f(m['length_incorrect'], '.1f')} "
        f"kl {f(m['kl'], '.3f')} {m['tokens_per_s'] / 1000:.1f}k tok/s"
    )


def announcer(enabled: bool) -> Callable[[str], None] | None:
    """A callable printing a line at once (the warm start's progress), or None when the run shows nothing."""
    if not enabled:
        return None
    return lambda text: print(text, flush=True)


class ProgressBar:
    """A rich progress bar of :func:`step_text` in a terminal, a plain line outside one, nothing when disabled."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        self.enabled, self.total = enabled, total
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]drgrpo"),
                BarColumn(bar_width=16),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.task = self.bar.add_task("", total=total, completed=start)
            self.bar.start()

    def update(self, m: dict[str, Any], accuracy: float | None) -> None:
        """One step done: ``m`` its metrics (:func:`drgrpo.train.loop.metrics.step_metrics`), ``accuracy`` the latest
        held-out accuracy (None: none yet)."""
        step = m["step"]
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=step_text(m, accuracy))
        elif self.enabled and (step % PLAIN_EVERY == 0 or step == self.total):
            print(f"step {step}/{self.total}: {step_text(m, accuracy)}", flush=True)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
