"""Rewards: callables ``(completion, example) -> float``, imported by name and called so they cannot harm the run.

A reward is the user's code, run inside the trainer's process as a plain call (:mod:`drgrpo.train.run.stopping` says
why: bitwise reproducible results, no cost per call, ``SIGALRM``-based time limits keep working). Being in the
process, a reward can do what only the process should: exit, stop on a KeyboardInterrupt of its own, replace the
handlers that save the run on a signal, change the working directory, or fork a copy of the trainer. Every call
(:func:`call_reward`) therefore

- gets its own deep copy of the example, so a reward that edits it changes neither the other calls of the step
  nor later steps (nor a resumed run's result);
- catches every ``BaseException`` the reward raises (``SystemExit``, ``KeyboardInterrupt``, ...) as a
  :class:`RewardError`, the failed step that saves the last completed one (exit code 1). Signals from outside
  keep their meaning: the trainer's handler raises :class:`~drgrpo.train.run.stopping.Interrupted` or
  :class:`~drgrpo.train.run.stopping.TimeLimitExceeded`, which pass through;
- afterwards checks the process: a call that returns in a forked child ends that child at once (``os._exit``:
  no cleanup, no buffered output, no second trainer); in the parent, a fork, a changed working directory or a
  replaced SIGINT/SIGTERM handler is put back and fails the step, naming the reward and what it did.

Errors name the reward, the example (its position in the dataset), the completion (its row in the batch) and the
step, in one line.
"""

from __future__ import annotations

import _signal  # getsignal without signal's enum conversion: 0.02 us a call instead of 6
import contextlib
import copy
import importlib
import json
import math
import numbers
import os
import reprlib
import signal
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from drgrpo.train.run.stopping import Interrupted, TimeLimitExceeded, Watchdog
from drgrpo.train.train_config import check_reward_fields

Example = dict[str, Any]
RewardFn = Callable[[str, Example], float]

DEFAULT_REWARD = "drgrpo.train.loop.task:exact_match"
"""The reward of a run given none: the built-in task's exact match."""

MOVED_REWARDS = {"drgrpo.train.task:exact_match": DEFAULT_REWARD}
"""Reward names from before ``drgrpo.train`` was split into packages, which a saved ``config.yaml`` or checkpoint
may hold (``--reward drgrpo.train.task:exact_match``): each still loads, as the function it names now."""

LIMIT_TEXT = "the largest reward whose advantages the loss's dtype holds"
"""Why a reward has a limit (:meth:`Rewards.__call__`), in error messages."""

FORKED_CHILD_EXIT = 70
"""Exit status of a process forked inside a reward that returned into the trainer (it ends there, at once)."""

GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals whose handlers save the run (:class:`~drgrpo.train.run.stopping.StopOnSignal`): a reward may not
replace them."""

_forks = [0]
"""How many times this process forked with ``os.fork`` (counted in the parent, by the hook below)."""


def _count_fork() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_parent=_count_fork)


class RewardError(RuntimeError):
    """A reward function raised, returned something that is not a finite number, or changed the process."""


def load_reward(spec: str) -> RewardFn:
    """Import ``'package.module:function'`` and check it is callable.

    Whatever importing the module does wrong (a syntax error, an exception, ``sys.exit()``) is a ValueError
    naming the reward, before any work; a fork during the import ends the child at once.
    """
    module_name, sep, attr = MOVED_REWARDS.get(spec, spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r} must be 'module:function', e.g. '{DEFAULT_REWARD}'")
    pid, cwd = os.getpid(), _getcwd()
    try:
        try:
            module = importlib.import_module(module_name)
        finally:
            if os.getpid() != pid:  # a fork at import: the child must not go on to train
                os._exit(FORKED_CHILD_EXIT)
    except ImportError as exc:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    except SyntaxError as exc:
        raise ValueError(
            f"reward {spec!r}: module {module_name!r} has a syntax error: {exc.filename}, line {exc.lineno}: {exc.msg}"
        ) from None
    except SystemExit as exc:
        raise ValueError(f"reward {spec!r}: importing module {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise ValueError(
            f"reward {spec!r}: importing module {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if cwd is not None and _getcwd() != cwd:
        os.chdir(cwd)
        raise ValueError(f"reward {spec!r}: importing module {module_name!r} changed the working directory")
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable (got {type(fn).__name__})")
    return fn  # type: ignore[return-value]


@dataclass(frozen=True)
class Rewards:
    """Weighted reward callables; the first is the correctness reward behind ``accuracy`` (when it scores 0 or 1)."""

    names: tuple[str, ...]
    fns: tuple[RewardFn, ...]
    weights: tuple[float, ...]

    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Sequence[float] = ()) -> Rewards:
        specs, weights = check_reward_fields(specs, weights)
        specs = specs or (DEFAULT_REWARD,)
        weights = weights or (1.0,) * len(specs)
        if len(weights) != len(specs):
            raise ValueError(f"{len(weights)} reward weights for {len(specs)} rewards; give one weight per reward")
        return cls(specs, tuple(load_reward(s) for s in specs), weights)

    def __call__(
        self,
        completions: Sequence[str],
        examples: Sequence[Example],
        indices: Sequence[int],
        limit: float = math.inf,
        step: int | None = None,
        watchdog: Watchdog | None = None,
    ) -> tuple[list[float], list[float]]:
        """(total weighted reward, first reward) per completion, as Python floats (float64); raises
        :class:`RewardError` on a bad value or a call that harmed the process (:func:`call_reward`).

        ``indices`` are the examples' positions in their dataset, used in error messages with the completion's
        position in ``completions`` and the RL ``step``. ``limit``: the largest magnitude a reward and a total may
        have (the range of the dtype the advantages are computed in; beyond it they would become infinite).
        ``watchdog``: bounds every call (``--reward-timeout``, :func:`call_reward`); None: unbounded.
        """
        totals, firsts = [], []
        for position, (completion, ex, idx) in enumerate(zip(completions, examples, indices, strict=True)):
            total = 0.0
            for k, (name, fn, w) in enumerate(zip(self.names, self.fns, self.weights, strict=True)):
                value = call_reward(name, fn, completion, ex, idx, position, limit, step, watchdog)
                total += w * value
                if k == 0:
                    firsts.append(value)
            if not (math.isfinite(total) and abs(total) <= limit):
                terms = " + ".join(f"{w} * {n}" for n, w in zip(self.names, self.weights, strict=True))
                why = f"beyond {limit:.3g}, {LIMIT_TEXT}" if math.isfinite(total) else "not a finite number"
                raise RewardError(
                    f"the weighted reward {terms} is {total}, {why}, on example {_describe(ex, idx)} with "
                    f"{_completion(completion, position)}{_at(step)}; scale the rewards or --reward-weights down"
                )
            totals.append(total)
        return totals, firsts


def call_reward(
    name: str,
    fn: RewardFn,
    completion: str,
    example: Example,
    index: int | None = None,
    position: int | None = None,
    limit: float = math.inf,
    step: int | None = None,
    watchdog: Watchdog | None = None,
) -> float:
    """``fn(completion, copy of example)`` as a finite float of magnitude at most ``limit``, or a
    :class:`RewardError` naming the reward, the example (``index``: its position in the dataset), the completion
    (``position``: its row in the batch), the ``step`` and what went wrong.

    The call cannot harm the run (the module docstring): any exception, ``SystemExit`` and ``KeyboardInterrupt``
    included, is a RewardError; a forked child returning here ends at once; a changed working directory or
    SIGINT/SIGTERM handler is put back and is a RewardError. Given a ``watchdog`` (a run's ``--reward-timeout``, the
    trainer passes its :class:`~drgrpo.train.run.stopping.StopOnSignal`'s), the call is bounded: a call past the
    limit is abandoned with a RewardError. Signals from outside pass through
    (:class:`~drgrpo.train.run.stopping.Interrupted`).
    """
    before = _Process()

    def where() -> str:
        return f"on example {_describe(example, index)} with {_completion(completion, position)}{_at(step)}"

    try:
        try:
            if watchdog is None:
                value = fn(completion, own_copy(example))
            else:
                with watchdog.timing():
                    value = fn(completion, own_copy(example))
        finally:
            if os.getpid() != before.pid:  # a forked child came back here: it must not go on training
                os._exit(FORKED_CHILD_EXIT)
    except TimeLimitExceeded:
        before.restore()
        seconds = watchdog.seconds if watchdog is not None else 0.0
        raise RewardError(
            f"reward {name} ran longer than --reward-timeout {seconds:g} s {where()}; the call was abandoned"
        ) from None
    except Interrupted:  # SIGINT/SIGTERM from outside, within a run: the run stops (exit code 130)
        before.restore()
        raise
    except KeyboardInterrupt as exc:
        if before.handlers[0] is signal.default_int_handler:  # Python's own handler: a real Ctrl-C, outside a run
            before.restore()
            raise
        changed = before.restore()
        raise RewardError(
            f"reward {name} raised KeyboardInterrupt{_also(changed)} {where()} "
            "(a reward cannot stop the run; Ctrl-C or SIGTERM from outside still stops it, saving the last step)"
        ) from exc
    except SystemExit as exc:
        changed = before.restore()
        raise RewardError(
            f"reward {name} called sys.exit({exc.code!r}) (SystemExit){_also(changed)} "
            f"{where()}; a reward cannot end the run"
        ) from exc
    except BaseException as exc:
        changed = before.restore()
        raise RewardError(f"reward {name} raised {type(exc).__name__}: {exc}{_also(changed)} {where()}") from exc
    changed = before.restore()
    if changed:
        raise RewardError(
            f"reward {name} {'; '.join(changed)} {where()}; a reward must leave the trainer's process as it found it"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward {name} returned {reprlib.repr(value)} ({type(value).__name__}), expected a float, {where()}"
        )
    try:
        value = float(value)
    except OverflowError:
        raise RewardError(
            f"reward {name} returned {reprlib.repr(value)} ({type(value).__name__}), too large for a float, {where()}"
        ) from None
    if not math.isfinite(value):
        raise RewardError(f"reward {name} returned {value} (not finite) {where()}")
    if abs(value) > limit:
        raise RewardError(
            f"reward {name} returned {value:.6g}, beyond {limit:.3g}, {LIMIT_TEXT}, {where()}; scale the reward down"
        )
    return value


class _Process:
    """What a reward call must leave as it found it: the working directory, the handlers of SIGINT and SIGTERM,
    and the process itself (no fork)."""

    __slots__ = ("cwd", "forks", "handlers", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.forks = _forks[0]
        self.cwd = _getcwd()
        self.handlers = tuple(_signal.getsignal(s) for s in GUARDED_SIGNALS)

    def restore(self) -> list[str]:
        """Put back what the call changed; what it did, one phrase per change (empty: nothing)."""
        changed = []
        if _forks[0] != self.forks:
            changed.append(
                "called os.fork() (the child that came back to the trainer was ended at once; a reward that needs "
                "processes can use subprocess, or multiprocessing with the 'spawn' start method)"
            )
        if self.cwd is not None:
            now = _getcwd()
            if now != self.cwd:
                os.chdir(self.cwd)
                changed.append(f"changed the working directory to {now!r} (os.chdir; changed back to {self.cwd!r})")
        for sig, old in zip(GUARDED_SIGNALS, self.handlers, strict=True):
            new = _signal.getsignal(sig)
            if new != old:
                with contextlib.suppress(ValueError, TypeError):  # not the main thread, or a handler not Python's
                    signal.signal(sig, old)
                changed.append(
                    f"replaced the {signal.Signals(sig).name} handler with {_handler_name(new)} (signal.signal; the "
                    "trainer's, which saves the run on a signal, is put back)"
                )
        return changed


_ATOMS = (str, int, float, bool, type(None))


def own_copy(value: Any) -> Any:
    """A deep copy of ``value``: JSON data (dicts, lists, strings, numbers) copied directly, five times faster than
    :func:`copy.deepcopy`, which copies anything else."""
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in _ATOMS else own_copy(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _ATOMS else own_copy(v) for v in value]
    if kind in _ATOMS:
        return value
    return copy.deepcopy(value)


def _getcwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the directory was removed: nothing to compare
        return None


def _handler_name(handler: Any) -> str:
    if handler is signal.default_int_handler:
        return "Python's default (KeyboardInterrupt)"
    if handler in (signal.SIG_DFL, signal.SIG_IGN):  # (0 and 1 from _signal.getsignal)
        return signal.Handlers(handler).name
    return getattr(handler, "__qualname__", None) or repr(handler)


def _also(changed: list[str]) -> str:
    return f" (it also {'; '.join(changed)})" if changed else ""


def _at(step: int | None) -> str:
    return f", at step {step}" if step is not None else ""


def _completion(completion: str, position: int | None) -> str:
    return (
        f"completion {position} of the batch, {completion!r}" if position is not None else f"completion {completion!r}"
    )


def _describe(example: Example, index: int | None) -> str:
    text = json.dumps(example, default=str)
    if len(text) > 200:
        text = text[:200] + "...}"
    return f"#{index} {text}" if index is not None else text


REWARD_TRACEBACK = "reward_traceback"
"""The attribute of a RewardError that holds :func:`reward_traceback`, set where the reward ran when the error
crosses a process (``drgrpo compare``'s runs): a traceback does not."""


def reward_traceback(exc: BaseException) -> str:
    """The frames of the user's reward in a RewardError's cause, formatted ('' for any other error)."""
    text = getattr(exc, REWARD_TRACEBACK, None)
    if text is None and isinstance(exc, RewardError) and exc.__cause__ is not None:
        frames = traceback.extract_tb(exc.__cause__.__traceback__)[1:]  # drop drgrpo's call_reward frame
        text = "".join(traceback.format_list(frames)).rstrip()
    return text or ""
