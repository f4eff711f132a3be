"""How a run stops: SIGINT and SIGTERM, rewards that hang, and every process stopping at the same point.

:class:`StopOnSignal` installs the handlers: a signal raises :class:`Interrupted` at once inside an abandonable
section (the warm start, a step's rollout and rewards, an evaluation) and otherwise lets the step end and be saved;
``deferred()`` sections (the optimizer step, a checkpoint or metrics write) are never cut. :class:`Watchdog` bounds
each reward call (``--reward-timeout``, :class:`TimeLimitExceeded`); :func:`agreed` makes every process stop at
the same point. The design, and why rewards stay plain calls in the main thread: docs/design.md, section 9.10.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from drgrpo.distributed import distributed_world_size, is_distributed


class Interrupted(BaseException):
    """SIGINT or SIGTERM ended the step in progress. A BaseException, like KeyboardInterrupt, so that a reward's
    ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, elsewhere: bool = False) -> None:
        self.signum = signum
        name = signal.Signals(signum).name if signum else "a signal"
        super().__init__(f"stopped by {name}" + (" on another process" if elsewhere else ""))


class TimeLimitExceeded(BaseException):
    """A reward call ran past ``--reward-timeout`` (raised inside the call; a BaseException for the same reason)."""


class FailedElsewhere(RuntimeError):
    """Another process failed at a point where this one did not: every process stops there."""


ABANDON, FINISH, DEFER = "abandon", "finish", "defer"


class StopOnSignal:
    """Within its ``with`` block: SIGINT and SIGTERM stop the run as the module docstring says.

    ``stopped`` is True once a signal arrived; :meth:`abandonable` and :meth:`deferred` mark sections. The trainer
    passes it down as the :class:`Stop` of the work it runs (no global: code outside a run gets :data:`NO_STOP`).
    ``reward_timeout`` (seconds, 0: none) starts the watchdog of reward calls (:meth:`Watchdog.timing`).
    ``escalate``: a second signal acts at once (False under several processes: every signal acts as the first).
    Handlers are installed only in the main thread (elsewhere Python allows none): there signals keep their
    default meaning and the reward time limit is not available.
    """

    def __init__(self, reward_timeout: float = 0.0, escalate: bool = True) -> None:
        self.escalate = escalate
        self.stopped = False
        self.signum = 0
        self.count = 0
        self.mode = FINISH
        self.watchdog = Watchdog(reward_timeout) if reward_timeout > 0 else None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if self.watchdog is not None and not hasattr(signal, "pthread_kill"):
            raise ValueError("--reward-timeout needs a POSIX system (it stops a call with a signal to its thread)")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
            if self.watchdog is not None:
                self.watchdog.start()
        elif self.watchdog is not None:
            raise ValueError("--reward-timeout needs the run in the main thread (it stops a call with a signal)")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.watchdog is not None and self.watchdog.claim():  # the watchdog's own SIGINT: a call ran too long
            if self.watchdog.expired():
                raise TimeLimitExceeded
            return  # the call ended before the signal was handled: nothing to do
        self.count += 1 if self.escalate else 0
        self.stopped, self.signum = True, signum
        if self.mode == ABANDON or (self.mode == FINISH and self.count > 1):
            raise Interrupted(signum)

    @contextlib.contextmanager
    def section(self, mode: str) -> Iterator[None]:
        """Within the block, signals act as ``mode`` says (:data:`ABANDON`, :data:`FINISH`, :data:`DEFER`)."""
        if mode == ABANDON and self.stopped:
            raise Interrupted(self.signum)  # a signal came before: start no abandonable work
        outer, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = outer

    def abandonable(self) -> contextlib.AbstractContextManager[None]:
        """A section whose work the first signal abandons at once (raising :class:`Interrupted` inside it)."""
        return self.section(ABANDON)

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        """A section no signal interrupts: a signal within it only sets ``stopped``."""
        return self.section(DEFER)


class Stop(Protocol):
    """What the loop's work needs of the run's signal handling, passed to it by the trainer: sections that no
    signal may cut (an optimizer step, a checkpoint or metrics write), and the watchdog of reward calls.
    :class:`StopOnSignal` is one; :data:`NO_STOP` (outside a run) defers nothing and bounds no call."""

    @property
    def watchdog(self) -> Watchdog | None:
        """The watchdog of reward calls (``--reward-timeout``), or None."""
        ...

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        """A section no signal interrupts (the signal waits for its end)."""
        ...


class _NoStop:
    """:class:`Stop` outside a run: signals keep their default meaning, reward calls are not bounded."""

    watchdog: Watchdog | None = None

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


NO_STOP: Stop = _NoStop()
"""The :class:`Stop` of work done outside a run (a test, a benchmark): nothing deferred, no watchdog."""


class Watchdog:
    """Bounds the time of each call made within :meth:`timing` to ``seconds``, from a thread of its own.

    The thread looks at the running call every ``min(0.1, seconds / 20)`` seconds; a call past its deadline gets
    one SIGINT sent to the main thread (``signal.pthread_kill``, which also ends a blocking sleep or read), which
    :class:`StopOnSignal` turns into :class:`TimeLimitExceeded` inside the call. Calls are numbered, so a SIGINT
    that arrives after its call ended (or in the next call) is recognised and ignored. No lock: the main thread
    sets a call's deadline before its number, and the thread reads the number first.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident or 0
        self._call = 0  # the number of the running call (0: none)
        self._count = 0  # calls started so far
        self._deadline = 0.0
        self._expired = 0  # the call the thread found past its deadline
        self._sent = 0  # SIGINTs sent by the thread
        self._seen = 0  # ... and claimed by the main thread's handler

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="drgrpo-reward-timeout", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """The block is one call, bounded by ``seconds``."""
        self._count += 1
        self._deadline = time.monotonic() + self.seconds
        self._call = self._count
        try:
            yield
        finally:
            self._call = 0

    def claim(self) -> bool:
        """In the handler of SIGINT: True when this SIGINT is one the thread sent (each is claimed once)."""
        if self._sent > self._seen:
            self._seen += 1
            return True
        return False

    def expired(self) -> bool:
        """In the handler: whether the running call is the one the thread found past its deadline."""
        return self._call != 0 and self._call == self._expired

    def _watch(self) -> None:
        poll = min(0.1, self.seconds / 20)
        while not self._closed.wait(poll):
            call = self._call
            if call and call != self._expired and time.monotonic() > self._deadline:
                self._expired = call
                self._sent += 1
                signal.pthread_kill(self._main, signal.SIGINT)


@contextlib.contextmanager
def agreed(stop: StopOnSignal | None, device: torch.device | None = None) -> Iterator[None]:
    """This process's own work (no collective operation inside), then one agreement of every process on its end.

    The block is abandonable (``stop``: the first signal abandons it). Whatever ends it early on one process (an
    exception, a signal) ends it on all: after the block one ``all_reduce`` tells every process which processes
    failed or were stopped, and each raises: its own exception, else :class:`Interrupted` when a process was
    stopped, else :class:`FailedElsewhere`. Every exception raised here is marked as agreed
    (:func:`is_agreed`), so the processes can save together. On one process: the block, as it is.
    """
    failure: BaseException | None = None
    try:
        with stop.abandonable() if stop is not None else contextlib.nullcontext():
            yield
    except (Exception, Interrupted) as exc:
        failure = exc
    if is_distributed():
        world, rank = distributed_world_size(), torch.distributed.get_rank()
        votes = torch.zeros(2, world, device=device)
        votes[0 if isinstance(failure, Interrupted) else 1, rank] = float(failure is not None)
        torch.distributed.all_reduce(votes)
        stopped, failed = (v.nonzero().flatten().tolist() for v in votes)
        if failure is None and stopped:
            failure = Interrupted(stop.signum if stop is not None and stop.signum else signal.SIGTERM, elsewhere=True)
        elif failure is None and failed:
            failure = FailedElsewhere(
                f"process {failed[0]} of {world} failed (see its error); every process stopped at the same point"
            )
    if failure is not None:
        failure.drgrpo_agreed = True  # type: ignore[attr-defined]
        raise failure


def is_agreed(exc: BaseException) -> bool:
    """Whether every process raised ``exc`` (or its own error) at the same point (:func:`agreed`)."""
    return bool(getattr(exc, "drgrpo_agreed", False))
