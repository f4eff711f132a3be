"""The progress bar (rank 0), and the signals that stop a run at the end of a step."""

from __future__ import annotations

import signal
import threading
from typing import Any


class ProgressBar:
    """A rich progress bar showing reward, held-out accuracy, lengths, KL and speed (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        if enabled:
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
        if self.bar is None:
            return

        def f(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        self.bar.update(
            self.task,
            advance=1,
            description=(
                f"reward {f(m['reward'], '.2f')} acc {f(accuracy, '.2f')} "
                f"len right/wrong {f(m['length_correct'], '.1f')}/{f(m['length_incorrect'], '.1f')} "
                f"kl {f(m['kl'], '.3f')} {m['tokens_per_s'] / 1000:.1f}k tok/s"
            ),
        )

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class StopOnSignal:
    """Within its ``with`` block, SIGINT and SIGTERM set ``stopped``: the run saves a checkpoint at the end of
    the step and returns. A second SIGINT raises KeyboardInterrupt at once (the checkpoints on disk are
    intact: every write is atomic).
    """

    def __init__(self) -> None:
        self.stopped = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stopped and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stopped = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
