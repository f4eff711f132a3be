"""The run's ``metrics.jsonl``: its name, reading it back (a cut-off last line is left out), and the writer
:class:`MetricsLog` with its disk checks (plus optional TensorBoard events).

The metrics themselves are computed by the loop (:mod:`drgrpo.train.loop.metrics`); this file is what a resume
reads and rewrites, so it belongs to the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from drgrpo.train.run.disk import write_error
from drgrpo.train.run.stopping import NO_STOP, Stop

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
