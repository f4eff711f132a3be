"""Output to a reader that may stop reading (``drgrpo train ... | head``).

A command's output on stdout and stderr is for people; a run's results are its files. When the reader of a
pipe goes away (``head`` has its lines), the next write fails with EPIPE, which Python raises as
``BrokenPipeError`` (it ignores SIGPIPE). Left alone, that error fails the step whose progress line it was,
or ends the command with a traceback after the run. :func:`reader_may_leave` points the stream at
``os.devnull`` at the first such failure instead, and the command goes on to its end: the run's files are
written as they would be without the pipe, and the exit code is the command's own (0 done, 1 a failed step,
2 a configuration error, 130 a signal), whatever the reader did.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO


class DiscardWhenClosed:
    """A text stream that writes to ``stream`` until its reader has gone, then to ``os.devnull``.

    Everything but ``write`` and ``flush`` (``isatty``, ``encoding``, ``fileno``, ...) is the wrapped stream's.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.closed_pipe = False
        """True once a write or flush met a pipe without a reader."""

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.discard()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.discard()

    def discard(self) -> None:
        """From now on write to ``os.devnull``: the stream's file descriptor itself when it has one (so that its
        buffer, and Python's flush at exit, go there too), else a stream of its own."""
        self.closed_pipe = True
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            self.stream = open(os.devnull, "w")  # noqa: SIM115 (open for the rest of the process)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        with contextlib.suppress(BrokenPipeError):  # what the failed write left in the buffer: now to devnull
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def reader_may_leave() -> Iterator[None]:
    """Within: ``sys.stdout`` and ``sys.stderr`` are :class:`DiscardWhenClosed`; a closed pipe loses only output."""
    saved = sys.stdout, sys.stderr
    out, err = DiscardWhenClosed(sys.stdout), DiscardWhenClosed(sys.stderr)
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        yield
    finally:
        out.flush()
        err.flush()
        sys.stdout, sys.stderr = saved
