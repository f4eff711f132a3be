"""A run's identity: its id, and the line of config.yaml that carries it with a checksum of the file's keys.

A run gets an id when it starts (:func:`new_run_id`); resumes keep it, and a branch (a new run started from another
run's checkpoint) gets its own and records its parent's id and step. Every checkpoint's ``trainer_state.json``
holds the id (``run_id``), and config.yaml's last comment line names it with a checksum of the keys below::

    # run 3f9c2a7d41b08e65; sha256 of the keys below: 0b6f1c0e9d2a4b57

With both, a run tells its own files from any other's: a checkpoint copied in from another run, or reached
through a link (:func:`drgrpo.train.run.checkpoint.check_owner`); a config.yaml that a person wrote or edited, which a
run would otherwise overwrite (:func:`config_problem`).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from drgrpo.train.train_config import CONFIG_FILE, TrainConfig

RUN_LINE = re.compile(r"# run ([0-9a-f]+); sha256 of the keys below: ([0-9a-f]{16})")
HEADER = "# drgrpo train --config this-file reruns this run; keys are the flags of drgrpo train\n"
WHERE_KEYS = ("output-dir", "resume")
"""Keys of config.yaml that say where a run is, not what it computes: left out when an edit is looked for."""


def new_run_id() -> str:
    """A new run's id: 16 random hexadecimal digits."""
    return uuid.uuid4().hex[:16]


def checksum(body: str) -> str:
    """The first 16 hexadecimal digits of the SHA-256 of config.yaml's keys (the text after its comment lines)."""
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def config_body(config: TrainConfig) -> str:
    """config.yaml's keys: every flag of ``config`` (a TrainConfig) as YAML."""
    return yaml.safe_dump(config.to_flags(), sort_keys=False)


def write_config(out_dir: str | Path, config: TrainConfig, run_id: str, notes: list[str]) -> Path:
    """Write ``out_dir/config.yaml`` atomically: the header, ``notes`` (the run's history) as comment lines, the
    run line (id and checksum), then every flag of ``config`` (``drgrpo train --config`` reruns it)."""
    out_dir = Path(out_dir)
    body = config_body(config)
    text = HEADER + "".join(f"# {note}\n" for note in notes) + f"# run {run_id}; sha256 of the keys below: "
    text += checksum(body) + "\n" + body
    path, tmp = out_dir / CONFIG_FILE, out_dir / f".{CONFIG_FILE}.{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class ConfigFile:
    """What a run directory's config.yaml says of itself (:func:`read_config`)."""

    path: Path
    """The file."""
    run_id: str | None
    """The id on its run line; None without one (written by a person, or by drgrpo before run ids)."""
    intact: bool
    """Its keys are as drgrpo wrote them (the run line's checksum matches)."""
    flags: dict[str, Any] | None
    """Its keys, parsed; None when it is not a YAML mapping."""


def read_config(run_dir: str | Path) -> ConfigFile | None:
    """``run_dir/config.yaml`` read (None when there is none)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    text = path.read_bytes().decode("utf-8", errors="replace")
    run_id, intact, body = None, False, text
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = RUN_LINE.fullmatch(line.rstrip("\n"))
        if match:
            body = "".join(lines[i + 1 :])
            run_id, intact = match.group(1), checksum(body) == match.group(2)
            break
    try:
        flags = yaml.safe_load(text)
    except yaml.YAMLError:
        flags = None
    return ConfigFile(path, run_id, intact, flags if isinstance(flags, dict) else None)


def config_run_id(run_dir: str | Path) -> str | None:
    """The run id on ``run_dir/config.yaml``'s run line (None: no such file or line)."""
    found = read_config(run_dir)
    return found.run_id if found else None


def flag_differences(found: dict[str, Any], config: TrainConfig, where: str = "for the run") -> list[str]:
    """The keys of ``found`` (a config.yaml's flags) whose values differ from ``config``'s (a TrainConfig), but
    those of :data:`WHERE_KEYS`: 'lr: 0.02 in the file, 0.01 for the run' items (``where`` ends them)."""
    expected = yaml.safe_load(config_body(config))
    keys = [k for k in {**expected, **found} if k not in WHERE_KEYS]
    return [
        f"{k}: {_show(found.get(k, '(missing)'))} in the file, {_show(expected.get(k, '(no such flag)'))} {where}"
        for k in keys
        if found.get(k, "(missing)") != expected.get(k, "(no such flag)")
    ]


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def config_problem(run_dir: Path, config: TrainConfig, run_id: str | None, resumed: TrainConfig | None) -> str | None:
    """Why a run may not (over)write ``run_dir/config.yaml``, or None when nothing would be lost.

    ``config`` is the run's TrainConfig, ``run_id`` its id; ``resumed`` is the TrainConfig of the checkpoint a resume
    in place continues from (None for a new run or a branch). The file may be replaced when it is absent, holds
    exactly the flags the run will write, or is drgrpo's own, unedited, of this run (a resume) or of a run that
    left nothing else (a new run: the caller checks that there is no checkpoint and no metrics line). Anything else
    (a file a person wrote, an edit, another run's file) is kept: the message names it and how to go on.
    """
    found = read_config(run_dir)
    if found is None:
        return None
    same = found.flags is not None and not flag_differences(found.flags, config)
    if same:
        return None
    if resumed is None:  # a new run or a branch
        if found.intact:
            return None  # drgrpo's own file of a run that left nothing else
        return (
            f"{found.path} was not written by drgrpo, or was edited since, and this run would overwrite it with its "
            "own: start the run in another --output-dir, or move or delete the file first (to run with its flags, "
            f"--config {found.path} --output-dir NEW_DIR)"
        )
    if found.intact and found.run_id in (run_id, None):
        return None  # the run's own file, unedited
    if found.run_id is None and found.flags is not None and not flag_differences(found.flags, resumed):
        return None  # written before run ids, as the checkpoint's run had it
    if found.intact:
        what = f"is the config of another run ({found.run_id}, not {run_id})"
    elif found.flags is None:
        what = "was edited since the run wrote it (it is not a YAML mapping of flags)"
    else:
        diffs = flag_differences(found.flags, resumed, "in the checkpoint") or flag_differences(found.flags, config)
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        what = f"was edited since the run wrote it ({shown})"
    return (
        f"{found.path} {what}: --resume takes the run's flags from its checkpoint and the command line, and would "
        f"overwrite the file. To continue with the file's flags add --config {found.path} (flags that change what "
        "the run computes need a branch); to continue as the run was, undo the edit or delete the file (the run "
        "writes it again)"
    )
