"""How a run starts: new, resumed in its own directory, or branched into a new one; and the run's history.

One run per directory, and a run's history is one line of steps:

- **new** (no ``--resume``): OUTPUT_DIR must hold no checkpoint. A directory with one holds a run, which a new
  run would silently overwrite: refused, naming ``--resume`` and another ``--output-dir`` as the ways on.
- **resume** (``--resume RUN``, into RUN): continues from the run's newest checkpoint. A checkpoint older than
  the run's newest intact one is refused (naming both steps): continuing from it in RUN would overwrite the
  steps after it. Its metrics.jsonl keeps the lines up to the checkpoint's step (a line cut off by a full disk
  is repaired, with a warning), so it reads as one uninterrupted run.
- **branch** (``--resume CHECKPOINT --output-dir NEW``): a new run in NEW that starts from any checkpoint of
  another run, which is only read, never changed. NEW must hold no checkpoint; its metrics.jsonl starts with
  the old run's lines up to the checkpoint's step.

A run's files are its own (:mod:`drgrpo.train.run.identity`): a resume refuses a checkpoint of another run reached
through ``latest``, a link or a ``step_*`` copied into the run (naming it as a branch's source is the way to start
from it), and another number of processes than the checkpoint's (the sampling of a step depends on the process
rank); a new run or a branch never replaces a metrics.jsonl with lines or a config.yaml it did not write, and a
resume never overwrites an edit of config.yaml.

Flags that change what the run computes (the resume class of their field, given where the field is defined:
:func:`~drgrpo.train.train_config.flag`) are refused on resume, with the list of what differs (flag, the run's value,
the value given); a branch may change them. Flags that change only how it runs (``--steps``, the cadences,
devices, logging) are accepted. Every resume and branch is recorded in the run's history (``history`` in each
later checkpoint's trainer_state.json, and comment lines in config.yaml): the step, the checkpoint, the time and
every flag that changed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drgrpo.train.flags import flags_of
from drgrpo.train.run.checkpoint import (
    LATEST,
    STATE_FILE,
    check_checkpoint,
    check_owner,
    checkpoint_problem,
    checkpoints_of,
    find_checkpoint,
    owner_problem,
    read_state,
    step_of,
)
from drgrpo.train.run.identity import config_problem, config_run_id, new_run_id
from drgrpo.train.run.metrics_log import METRICS_FILE, read_metrics_file, warn_line
from drgrpo.train.train_config import RUN_PLACE, OnResume, TrainConfig, on_resume

EVAL_KEY = "eval/accuracy"
"""The key of the evaluation lines of metrics.jsonl."""


@dataclass(frozen=True)
class Change:
    """A flag given on resume with a value other than the run's."""

    flag: str
    """The flag's name without dashes, e.g. 'group-size'."""
    kind: OnResume
    """Its resume class (:data:`~drgrpo.train.train_config.OnResume`): 'meaning', 'checkpoint' or 'free'."""
    old: Any
    """The run's value."""
    new: Any
    """The value given."""

    def __str__(self) -> str:
        return f"--{self.flag} {show(self.old)} -> {show(self.new)}"


@dataclass(frozen=True)
class RunStart:
    """Where a run starts (:func:`plan_run`)."""

    checkpoint: Path | None = None
    """The checkpoint it continues from; None for a new run."""
    step: int = 0
    """The checkpoint's step (0 for a new run)."""
    source_run: Path | None = None
    """The run directory the checkpoint belongs to."""
    branch: bool = False
    """True when the run continues into another directory than the checkpoint's run."""
    history: tuple[dict[str, Any], ...] = ()
    """The run's resumes and branches so far, this one last (saved in every later checkpoint)."""
    checkpoint_lines: tuple[dict[str, Any], ...] = ()
    """The metrics lines of the checkpoint's step, as saved with it (to restore them if metrics.jsonl lost them)."""
    eval_pending: bool = False
    """The evaluation due at the checkpoint's step is not in its lines (a signal abandoned it): the run does it
    first, so that its metrics are those of an uninterrupted run."""
    run_id: str = ""
    """The run's id: new for a new run or a branch, the checkpoint's on a resume (:mod:`drgrpo.train.run.identity`)."""
    parent: dict[str, Any] | None = None
    """A branch's origin, kept by its resumes: the parent run's id, the step and the checkpoint it started from."""
    world_size: int | None = None
    """The number of processes that wrote the checkpoint (None: a new run, or a checkpoint that does not say)."""
    saved_config: TrainConfig | None = None
    """The checkpoint's TrainConfig (None for a new run)."""
    note: str = ""
    """A warning for the user once the run is accepted (a checkpoint from before run ids), or ''."""

    def notes(self) -> list[str]:
        """The history as comment lines for config.yaml."""
        return [history_note(entry) for entry in self.history]


def plan_run(config: TrainConfig) -> RunStart:
    """How ``config`` starts: a new run, or the checkpoint of ``config.resume`` checked whole, with the flags that
    changed. Only reads. Raises ValueError (a :class:`~drgrpo.train.run.checkpoint.CheckpointError` for a damaged
    checkpoint) listing the refused flags; :func:`check_run_dir` checks the output directory, under its lock.
    """
    if not config.resume:
        return RunStart(run_id=new_run_id())
    named = Path(config.resume)
    ckpt = check_checkpoint(find_checkpoint(named))
    state = read_state(ckpt)
    saved = TrainConfig.from_dict(state["train_config"])
    run_dir = ckpt.resolve().parent.parent  # where the checkpoint is, links followed
    out = Path(config.output_dir).resolve()
    direct = (named / STATE_FILE).is_file() and named.name != LATEST  # the checkpoint itself is named
    if not direct or out == Path(os.path.abspath(ckpt)).parent.parent.resolve():  # reached in, or continued in place
        check_owner(ckpt, f"To start a new run from it, name it as a branch's source: --resume {ckpt.resolve()} "
                          "--output-dir NEW_DIR")  # fmt: skip
    branch = out != run_dir
    changes = config_changes(saved, config)
    refused = [c for c in changes if c.kind == "checkpoint" or (c.kind == "meaning" and not branch)]
    if refused:
        raise ValueError(refusal(refused, config.resume, ckpt))
    entry = {
        "step": state["step"],
        "from": str(ckpt.resolve()),
        "branch": branch,
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "changed": {c.flag: [jsonable(c.old), jsonable(c.new)] for c in changes},
    }
    lines = state.get("metrics")  # None: a checkpoint from before drgrpo saved them
    evaluated = lines is None or any(EVAL_KEY in line for line in lines)
    run_id, parent, note = state.get("run_id"), state.get("parent_run"), ""
    if branch:
        parent = {"run_id": run_id, "step": state["step"], "checkpoint": str(ckpt.resolve())}
        run_id = new_run_id()
    elif not isinstance(run_id, str):
        run_id = config_run_id(run_dir) or new_run_id()  # a run of those days resumed since has an id already
        note = (f"{ckpt} records no run id (written before drgrpo recorded one): it is taken to be a checkpoint of "
                f"the run in {run_dir}, which is run {run_id} from now on")  # fmt: skip
    world = state.get("world_size")
    return RunStart(
        checkpoint=ckpt,
        step=state["step"],
        source_run=None if owner_problem(ckpt.resolve()) else run_dir,  # copied in: not that directory's lines
        branch=branch,
        history=(*state.get("history", ()), entry),
        checkpoint_lines=tuple(lines or ()),
        eval_pending=config.eval_due(state["step"]) and state["step"] > 0 and not evaluated,
        run_id=run_id,
        parent=parent if isinstance(parent, dict) else None,
        world_size=world if isinstance(world, int) else None,
        saved_config=saved,
        note=note,
    )


def check_processes(start: RunStart, world: int) -> RunStart:
    """``start`` once ``world`` processes run it: a resume in place needs the checkpoint's number of processes
    (ValueError saying why); a branch may change it, and records it in its history entry."""
    if start.checkpoint is None or start.world_size in (None, world):
        return start
    if not start.branch:
        raise ValueError(
            f"--resume {start.checkpoint}: the run ran on {start.world_size} processes, this resume on {world}. "
            "Every step samples from (seed, step, process rank), so another number of processes draws other "
            "completions than the uninterrupted run would: resume it on "
            f"{start.world_size} (torchrun --nproc-per-node {start.world_size}, or no torchrun for 1), or start a "
            f"branch on {world}: --resume {start.checkpoint} --output-dir NEW_DIR"
        )
    entry = {**start.history[-1], "processes": [start.world_size, world]}
    return dataclasses.replace(start, history=(*start.history[:-1], entry))


def check_run_dir(
    out_dir: Path, start: RunStart, warn: Callable[[str], None] | None = None, config: TrainConfig | None = None
) -> None:
    """Raise ValueError unless ``out_dir`` may take the run ``start`` describes (call it holding the directory's
    lock): a new run or a branch needs a directory without checkpoints and without metrics lines; a resume in place
    needs the checkpoint to be the run's newest intact one (newer damaged ones are replaced as the run goes on:
    ``warn`` says so). With the run's ``config``, its config.yaml must be one the run may replace
    (:func:`~drgrpo.train.run.identity.config_problem`: not written by a person, not edited)."""
    ckpts = checkpoints_of(out_dir / "checkpoints")
    if start.checkpoint is None or start.branch:
        if ckpts:
            way = (
                f"continue it with --resume {out_dir}, or start the new run in another --output-dir"
                if start.checkpoint is None
                else f"a branch (--resume {start.checkpoint} with another --output-dir) needs a new directory"
            )
            raise ValueError(
                f"--output-dir {out_dir} already holds a run (checkpoints up to {ckpts[-1].name}); one run per "
                f"directory: {way} (or delete {out_dir / 'checkpoints'} first)"
            )
        problem = unsaved_metrics(out_dir / METRICS_FILE, start)
        if problem is None and config is not None:
            problem = config_problem(out_dir, config, start.run_id, None)
        if problem is not None:
            raise ValueError(problem)
        return
    if config is not None:
        problem = config_problem(out_dir, config, start.run_id, start.saved_config)
        if problem is not None:
            raise ValueError(problem)
    for newer in reversed([c for c in ckpts if step_of(c) > start.step]):
        problem = checkpoint_problem(newer)
        if problem is None:
            raise ValueError(
                f"--resume {start.checkpoint} is step {start.step} of the run in {out_dir}, whose newest checkpoint "
                f"is step {step_of(newer)} ({newer}): continuing from step {start.step} there would overwrite the "
                f"steps after it. Continue the run from step {step_of(newer)} with --resume {out_dir}, or branch "
                f"from step {start.step} into a new run: --resume {start.checkpoint} --output-dir NEW_DIR"
            )
        (warn or warn_line)(f"{problem}; the run continues from step {start.step} and writes {newer.name} again")


def unsaved_metrics(path: Path, start: RunStart) -> str | None:
    """Why a new run or a branch may not replace ``path``, a metrics.jsonl with lines of steps (a run stopped before
    its first checkpoint), or None. Lines of step 0 only (the evaluation of the initial model, which the new run
    makes again: a run stopped in its first step) are replaced; so is a line that is not JSON with a step."""
    if not path.is_file():
        return None
    steps = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    done = [step for step in steps if step > 0]
    if not done:
        return None
    what = "a branch" if start.branch else "a new run"
    return (
        f"{path} holds {len(steps)} lines (steps {min(steps)} to {max(steps)}) of a run that left no checkpoint, so "
        f"there is nothing to --resume, and {what} would replace them: start it in another --output-dir, or move or "
        f"delete {path} first"
    )


def start_lines(out_dir: Path, start: RunStart, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The metrics lines the run's metrics.jsonl starts with: none for a new run; else the run's lines up to the
    checkpoint's step (for a branch, the old run's), plus the checkpoint's own lines if the file lost them.

    Lines after the checkpoint's step (written after it by a run that then stopped) are left out with a warning;
    they are written again, identically, as the run goes on."""
    if start.checkpoint is None:
        return []
    source = (start.source_run if start.branch and start.source_run else out_dir) / METRICS_FILE
    rows = read_metrics_file(source, warn) if source.is_file() else []
    kept = [row for row in rows if row["step"] <= start.step]
    later = sorted({row["step"] for row in rows if row["step"] > start.step})
    if later and not start.branch:
        steps = f"step {later[0]}" if len(later) == 1 else f"steps {later[0]} to {later[-1]}"
        (warn or warn_line)(
            f"{source}: left out the lines of {steps}, written after the checkpoint of step {start.step} (the run "
            "writes them again)"
        )
    missing = [line for line in start.checkpoint_lines if line not in kept]
    if missing:
        (warn or warn_line)(f"{source}: the lines of step {start.step} were missing; restored from {start.checkpoint}")
    return kept + missing


def config_changes(saved: TrainConfig, new: TrainConfig) -> list[Change]:
    """Every flag whose value in ``new`` differs from ``saved`` (the run's), with its resume class.

    Nested configurations give their own flags (``--task-max-operand``, ``--tiny-hidden-size``); the loss gives
    ``--loss`` and every LossConfig field that differs once resolved (``--clip-high``, ``--beta``, ...). A
    ``--model`` naming the run's model directory otherwise (relatively, absolutely) is no change.
    """
    names = {flag.dest: flag.name for flag, _, _ in flags_of(TrainConfig, "train") if flag is not None}
    changes = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in (*RUN_PLACE, "loss", "loss_overrides"):
            continue
        for dest, old, new_value in _leaves(getattr(saved, f.name), getattr(new, f.name), "train", f.name):
            if old != new_value and not (f.name == "model" and same_directory(old, new_value)):
                changes.append(Change(names.get(dest, dest), on_resume(f.name), old, new_value))
    if saved.loss != new.loss:
        changes.append(Change("loss", on_resume("loss"), saved.loss, new.loss))
    old_loss, new_loss, given = saved.loss_config(), new.loss_config(), dict(new.loss_overrides)
    for f in dataclasses.fields(old_loss):
        if f.name in ("name", "max_completion_length"):  # the preset (above); L, which is --max-new-tokens
            continue
        old, new_value = getattr(old_loss, f.name), getattr(new_loss, f.name)
        if old != new_value and (saved.loss == new.loss or f.name in given):
            changes.append(Change(f.name.replace("_", "-"), on_resume("loss_overrides"), old, new_value))
    return changes


def same_directory(old: Any, new: Any) -> bool:
    """Two --model values that name one directory (written relatively and absolutely, or through a link)."""
    return isinstance(old, str) and isinstance(new, str) and os.path.realpath(old) == os.path.realpath(new)


def _leaves(old: Any, new: Any, group: str, name: str) -> Iterator[tuple[str, Any, Any]]:
    """(flag destination as in :func:`~drgrpo.train.flags.flags_of`, old, new) for a field and its nested fields."""
    if dataclasses.is_dataclass(old) and not isinstance(old, type):
        for f in dataclasses.fields(old):
            yield from _leaves(getattr(old, f.name), getattr(new, f.name), name, f.name)
    else:
        yield f"{group}.{name}", old, new


def refusal(refused: list[Change], resume: str, ckpt: Path) -> str:
    """The one-line error for flags that cannot change on this resume."""
    parts = []
    meaning = [c for c in refused if c.kind == "meaning"]
    fixed = [c for c in refused if c.kind == "checkpoint"]
    if meaning:
        parts.append(
            f"{', '.join(map(str, meaning))} (the run's value -> the value given) would change what the run "
            "computes, so it cannot continue with them in its own directory. Leave them out to continue the run "
            f"as it was, or start a branch with them: --resume {ckpt} --output-dir NEW_DIR"
        )
    if fixed:
        parts.append(
            f"{', '.join(map(str, fixed))}: the checkpoint settles the model (its weights, and the model it started "
            "from), so these cannot change on resume; leave them out"
        )
    return f"--resume {resume}: " + ". ".join(parts)


def history_note(entry: dict[str, Any]) -> str:
    """One history entry as a line: 'resumed at step 4 from CKPT (TIME): --steps 6 -> 10'."""
    what = "branched" if entry.get("branch") else "resumed"
    changed = ", ".join(f"--{flag} {show(old)} -> {show(new)}" for flag, (old, new) in entry["changed"].items())
    if "processes" in entry:  # a branch on another number of processes
        old, new = entry["processes"]
        changed = ", ".join(filter(None, (changed, f"processes {old} -> {new}")))
    return f"{what} at step {entry['step']} from {entry['from']} ({entry['time']}): {changed or 'no flag changed'}"


def show(value: Any) -> str:
    """A flag's value as people write it: 'none', 'on'/'off', list items separated by spaces."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(show, value)) if value else "none"
    return str(value)


def jsonable(value: Any) -> Any:
    return [jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value
