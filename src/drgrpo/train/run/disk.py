"""A run's writes that fail: one line naming the file, and "No space left on device" when the disk is full.

Writers do not all keep the operating system's reason: Python's own files raise ``OSError(ENOSPC)``, safetensors
says ``No space left on device (os error 28)``, but ``torch.save`` only says ``file write failed`` or
``unexpected pos``. :func:`write_error` looks for the reason in the error and everything it chains, and, when the
writer lost it, at the free space of the disk the file was going to.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
FULL_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "StorageFull")


class WriteFailed(RuntimeError):
    """A file of the run could not be written; the message says which file, why, and what is safe on disk."""


def free_bytes(directory: str | Path) -> int | None:
    """Free bytes on the disk holding ``directory`` (its nearest existing parent); None if unknown."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """``n`` bytes for people: '512 B', '3.2 MiB', '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def is_full_disk(exc: BaseException, directory: str | Path, needed: int = 0) -> bool:
    """Whether ``exc`` (or an error it chains) is a full disk: errno ENOSPC/EDQUOT or the text of one, or, for an
    error that lost its reason, less free space on the disk of ``directory`` than ``max(needed, 1 MiB)``."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "errno", None) in FULL_DISK_ERRNOS or any(t in str(seen) for t in FULL_DISK_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(directory)
    return free is not None and free < max(needed, 1 << 20)


def write_error(what: str, exc: BaseException, directory: str | Path, needed: int = 0) -> WriteFailed:
    """The :class:`WriteFailed` to raise when writing ``what`` (e.g. 'the checkpoint of step 6 to RUN/checkpoints')
    into ``directory`` failed with ``exc``; ``needed`` is the size of what was being written, when known."""
    if is_full_disk(exc, directory, needed):
        free = free_bytes(directory)
        room = f"{size_text(free)} free" if free is not None else "free space unknown"
        need = f"; it needs about {size_text(needed)}" if needed else ""
        reason = f"No space left on device ({room}{need})"
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return WriteFailed(f"could not write {what}: {reason}")
