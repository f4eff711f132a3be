"""One run per output directory: an operating-system lock on ``OUTPUT_DIR/.lock`` for as long as a run lives.

``drgrpo train`` takes ``fcntl.flock(OUTPUT_DIR/.lock, LOCK_EX | LOCK_NB)`` before it writes anything there, and
writes into the file who holds it (process id, host, start time, command). A second run into the same directory
finds the lock taken and is refused at once, naming the holder. The operating system drops the lock when the
holder's process ends, however it ends (SIGKILL, a crash, a lost machine on a local disk), so a lock left behind
never blocks a later run: the file may stay, its lock does not.

Under ``torchrun`` the first process (rank 0) takes the lock, then every process learns with one all_reduce
whether it got it, and all raise alike if not (none waits for the others). ``--resume RUN`` continues into RUN,
so it takes RUN's lock too; a branch (``--resume CKPT --output-dir NEW``) only reads the old run and locks NEW.
``drgrpo eval`` and ``drgrpo plot`` only read (checkpoints are replaced atomically; a metrics line being written
is skipped with a warning), so they are not blocked by a run in progress.

On network file systems ``flock`` is as good as the file system's locking (Linux NFS clients map it to NFS
locks). Without ``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from drgrpo.distributed import any_process
from drgrpo.train.run.processes import Processes

LOCK_FILE = ".lock"


class RunInUse(ValueError):
    """The output directory holds a run in progress (another process holds its lock)."""


class RunLock:
    """The lock of ``out_dir``: :meth:`acquire` takes it (creating ``out_dir``), :meth:`release` drops it."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunInUse` naming its holder (ValueError: a directory that cannot be
        created or written)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--output-dir {str(self.out_dir)!r} is a file, not a directory")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(
                f"--output-dir {str(self.out_dir)!r}: cannot create or write it ({exc.strerror or exc})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise RunInUse(
                f"--output-dir {str(self.out_dir)!r} is in use by another run ({holder}): one run per directory. "
                "Wait for it to end or stop it, continue into another --output-dir, or read it meanwhile with "
                "drgrpo eval / drgrpo plot"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file drops it; the file stays, naming the last holder)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _holder_text(fd: int) -> str:
    """Who holds the lock, as written in the lock file: 'pid 123 on host h since 2026-12-01T10:00:00+00:00: cmd'."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode())
        return f"pid {info['pid']} on host {info['host']} since {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


@contextlib.contextmanager
def hold_run_dir(out_dir: str | Path, procs: Processes, check: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, this run owns ``out_dir``: rank 0 holds its lock, then runs ``check`` (what must hold of
    the directory, read under the lock). Every process raises when rank 0 could not take the lock or ``check``
    failed: rank 0 its error, the others a ValueError pointing to it.
    """
    lock = RunLock(out_dir)
    error: ValueError | None = None
    if procs.rank == 0:
        try:
            lock.acquire()
            if check is not None:
                check()
        except ValueError as exc:
            lock.release()
            error = exc
    if any_process(error is not None, procs.device):
        raise error or ValueError(f"--output-dir {str(out_dir)!r}: refused on process 0 (see its error)")
    try:
        yield
    finally:
        lock.release()
