"""The progress bar (rank 0). How signals stop a run: :mod:`drgrpo.train.stopping`."""

from __future__ import annotations

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
