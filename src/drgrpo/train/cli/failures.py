"""A failed step or a configuration error: how the command line tells them apart, by the phase that raised.

:func:`train_or_fail` runs :func:`~drgrpo.train.loop.trainer.train`'s two phases itself: an error of the set-up
propagates as it is (the command reports it on one line and exits with code 2), an error of the steps comes as
:class:`StepFailed` (exit code 1; the last completed step was saved). Library callers of ``train()`` get either
error unwrapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drgrpo.train.loop.trainer import TrainResult
    from drgrpo.train.train_config import TrainConfig


class StepFailed(Exception):
    """``cause``, raised by step ``step`` of a run (after its set-up): a failure, not a configuration error.

    It pickles with its cause, so a run of ``drgrpo compare`` (in a process of its own) reports it alike.
    """

    def __init__(self, step: int, cause: BaseException) -> None:
        super().__init__(step, cause)
        self.step = step
        """The step that failed (the last completed one, ``step - 1``, is saved)."""
        self.cause = cause
        """The error the step raised."""
        self.__cause__ = cause

    def __str__(self) -> str:
        return f"step {self.step} failed: {type(self.cause).__name__}: {self.cause}"


def train_or_fail(config: TrainConfig) -> TrainResult:
    """:func:`~drgrpo.train.loop.trainer.train`, with an error raised after the set-up wrapped in
    :class:`StepFailed` (an error of the set-up propagates unwrapped)."""
    from drgrpo.train.loop.trainer import run_steps, set_up  # torch and transformers: loaded when a run starts

    run = set_up(config)  # a configuration error: raised before any work
    with run:
        try:
            return run_steps(run)
        except Exception as exc:  # the last completed step is saved: a failed step
            raise StepFailed(run.result.step + 1, exc) from exc
