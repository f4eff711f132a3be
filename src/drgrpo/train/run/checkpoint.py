"""Checkpoints: a Hugging Face model directory plus what is needed to continue exactly, written atomically.

``RUN/checkpoints/step_000120/`` holds the ``save_pretrained`` files, ``optimizer.pt`` (tensors and numbers only,
read with ``weights_only=True``) and ``trainer_state.json`` (step, TrainConfig, LossConfig, initial model);
``RUN/checkpoints/latest`` names the newest. A checkpoint is written into a temporary directory and renamed into
place (:func:`clean_stale` removes what a killed write left); :func:`check_checkpoint` refuses a damaged one,
naming the file and the newest intact checkpoint; :func:`check_owner` refuses another run's. The layout, the
atomicity and a run's line of checkpoints: docs/design.md, section 9.11.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Protocol

import torch

from drgrpo.config import LossConfig
from drgrpo.train.run.disk import WriteFailed, free_bytes, write_error
from drgrpo.train.run.identity import config_run_id
from drgrpo.train.run.stopping import NO_STOP, Stop
from drgrpo.train.train_config import TrainConfig


class Saved(Protocol):
    """What a checkpoint holds of a run's state at the end of a step (the loop's
    :class:`~drgrpo.train.loop.update.TrainState` is one)."""

    model: Any
    """The policy: a Hugging Face causal LM (``save_pretrained``)."""
    tokenizer: Any
    """Its tokenizer (``save_pretrained``)."""
    optimizer: torch.optim.Optimizer
    """The optimizer, whose ``state_dict()`` is saved."""


STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LATEST = "latest"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
STEP_NAME = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a file missing or damaged (the message names it and the newest intact
    checkpoint), or a ``latest`` that names something else than a checkpoint of its run."""


class CheckpointWriteFailed(WriteFailed):
    """A checkpoint could not be written (the message says why and names the last intact checkpoint)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_of(root: str | Path) -> list[Path]:
    """The checkpoint directories ``root/step_N`` (those with a state file; not links, which lead out of the run),
    oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and not p.is_symlink() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=step_of)


def step_of(ckpt: Path) -> int:
    """The step of a checkpoint directory ``step_N``."""
    return int(ckpt.name.split("_")[1])


def newest_intact(root: str | Path, optimizer: bool = True, skip: Path | None = None) -> Path | None:
    """The newest checkpoint of ``root`` whose files are whole (:func:`checkpoint_problem`), other than ``skip``."""
    return next(
        (p for p in reversed(checkpoints_of(root)) if p != skip and checkpoint_problem(p, optimizer) is None), None
    )


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically and point ``root/latest`` at it; returns its path.

    ``state`` (JSON-serialisable: the configs, the initial model, the world size) goes into
    ``trainer_state.json`` beside ``step``. ``keep`` > 0 then removes all but the newest ``keep`` checkpoints.
    Raises :class:`~drgrpo.train.run.disk.WriteFailed` when the disk has less free space than the checkpoint's
    tensors take (before writing anything) or a write fails, naming the reason and the last intact checkpoint;
    what the failed write left is removed, and nothing else.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    needed = checkpoint_bytes(model, optimizer)
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = free_bytes(root)
        if free is not None and free < needed:
            raise OSError(errno.ENOSPC, "No space left on device")  # before writing: never fill the disk
        if tmp.exists():
            shutil.rmtree(tmp)
        write_files(tmp, step, model, tokenizer, optimizer, state)
        publish(tmp, final)
        point_latest(root, final)
    except Exception as exc:
        error = write_error(f"the checkpoint of step {step} to {root}", exc, root, needed)
        shutil.rmtree(tmp, ignore_errors=True)
        intact = newest_intact(root)
        last = f"the last intact checkpoint is {intact}" if intact else "no checkpoint was written before"
        raise CheckpointWriteFailed(f"{error}; {last}") from exc
    if keep > 0:
        prune(root, keep, final)
    return final


def checkpoint_bytes(model: Any, optimizer: torch.optim.Optimizer) -> int:
    """About the bytes a checkpoint of ``model`` and ``optimizer`` takes on disk (their tensors, each once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    for per_param in optimizer.state.values():
        tensors.update({t.data_ptr(): t for t in per_param.values() if isinstance(t, torch.Tensor) and t.dim()})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def prune(root: Path, keep: int, newest: Path) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints of ``root``, never ``newest`` (the one just written, which
    ``latest`` names). Each is renamed aside, then deleted, so that a process killed meanwhile leaves nothing that
    looks like a checkpoint. Returns the removed ones."""
    removed = [p for p in checkpoints_of(root)[:-keep] if p != newest]
    for ckpt in removed:
        aside = root / f".pruned_{ckpt.name}_{os.getpid()}"
        ckpt.rename(aside)
        shutil.rmtree(aside)
    return removed


def save_run_checkpoint(
    out_dir: Path,
    step: int,
    state: Saved,
    extra_state: dict[str, Any],
    rank: int,
    barrier: bool = True,
    keep: int = 0,
    stop: Stop = NO_STOP,
) -> Path | None:
    """The trainer's save: rank 0 writes ``out_dir/checkpoints/step_N`` from ``state``, then every
    process waits for it (``barrier``). Returns the checkpoint on rank 0, None elsewhere. Signals wait for the
    end of the write (``stop.deferred()``, :class:`~drgrpo.train.run.stopping.Stop`)."""
    path = None
    with stop.deferred():
        if rank == 0:
            path = save_checkpoint(
                out_dir / "checkpoints", step, state.model, state.tokenizer, state.optimizer, extra_state, keep
            )
        if barrier and torch.distributed.is_initialized():
            torch.distributed.barrier()
    return path


def write_files(
    directory: Path, step: int, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Every file of a checkpoint, into ``directory`` (a temporary directory: nothing reads it yet)."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    text = json.dumps({"step": step, **state}, indent=2, sort_keys=True, default=str)
    (directory / STATE_FILE).write_text(text)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` into ``final``; an older ``final`` is set aside first and removed after."""
    if not final.exists():
        tmp.rename(final)
        return
    old = final.parent / f".old_{final.name}_{os.getpid()}"
    final.rename(old)  # killed from here to the next rename: clean_stale puts `old` back
    tmp.rename(final)
    shutil.rmtree(old)


def point_latest(root: Path, final: Path) -> None:
    """Atomically make ``root/latest`` name ``final``."""
    tmp = root / f".latest_{os.getpid()}"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, root / LATEST)


def clean_stale(root: str | Path) -> list[Path]:
    """Remove what killed writes left in ``root`` (temporary directories and files, checkpoints being pruned);
    returns what was removed.

    A checkpoint set aside by an interrupted replacement (``.old_step_N_*`` with no ``step_N``) is
    renamed back instead. Call it on one process, when no other process is writing checkpoints.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for old in sorted(root.glob(".old_step_*")):
        name = old.name.removeprefix(".old_").rsplit("_", 1)[0]
        if not (root / name).exists():
            old.rename(root / name)
        else:
            shutil.rmtree(old)
            removed.append(old)
    for tmp in sorted(root.glob(".tmp_*")) + sorted(root.glob(".latest_*")) + sorted(root.glob(".pruned_*")):
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
        removed.append(tmp)
    return removed


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint named by ``path``: a checkpoint directory, or a run directory, its ``checkpoints/``
    directory or its ``latest`` file, which all name the run's newest checkpoint.

    Raises FileNotFoundError when there is none, and :class:`CheckpointError` when ``latest`` names something
    else than a checkpoint directory of its own run (a path, another run's checkpoint, a link out of the run).
    """
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        path = path.parent
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        check_latest(root)
        steps = checkpoints_of(root)
        if steps:
            return steps[-1]
    raise FileNotFoundError(
        f"no checkpoint under {str(path)!r}: expected a run directory with checkpoints/latest, "
        f"its checkpoints/latest file, or a checkpoint directory containing {STATE_FILE}"
    )


def check_latest(root: Path) -> None:
    """Raise :class:`CheckpointError` unless ``root/latest`` (if there) names a checkpoint directory in ``root``."""
    latest = root / LATEST
    if not latest.is_file():
        return
    name = latest.read_text().strip()
    inside = STEP_NAME.fullmatch(name) is not None and (root / name).resolve().parent == root.resolve()
    if not inside:
        raise CheckpointError(
            f"{latest} names {name!r}, which is not a checkpoint of this run (expected the name of a directory "
            f"step_NNNNNN in {root}); refused so that no other run's files are read or rewritten. Point it at "
            "one of this run's checkpoints, or delete it (the newest step_* is then the run's checkpoint)"
        )


def run_id_of(ckpt: str | Path) -> str | None:
    """The run id a checkpoint records (None: written before drgrpo recorded one, or unreadable)."""
    state, _ = _read_json(Path(ckpt) / STATE_FILE)
    run_id = state.get("run_id") if isinstance(state, dict) else None
    return run_id if isinstance(run_id, str) else None


def owner_problem(ckpt: Path) -> str | None:
    """Why ``ckpt``, found where it is (``RUN/checkpoints/NAME``), is not a checkpoint of the run in RUN, or None.

    It is another run's when it lies elsewhere (``NAME`` is a link out of RUN: ``latest`` or a ``step_*`` linked to
    another run's checkpoint), or when the run id it records is not RUN's (a ``step_*`` copied in from another run):
    RUN's id is the one on its config.yaml's run line and in its other checkpoints. A checkpoint written before run
    ids (no ``run_id``) cannot be told apart and is taken to be RUN's. A checkpoint outside any ``checkpoints/``
    directory belongs to no run directory: None.
    """
    place = Path(os.path.abspath(ckpt))
    if place.parent.name != "checkpoints":
        return None
    run_dir = place.parent.parent
    real = place.resolve()
    shown, shown_run = Path(ckpt), Path(ckpt).parent.parent  # as the user named them
    if real.parent.parent != run_dir.resolve():
        other, here = run_id_of(real), config_run_id(run_dir)
        return (
            f"{shown} leads to {real}, a checkpoint of another run{f' ({other})' if other else ''}, not of the run "
            f"in {shown_run}{f' ({here})' if here else ''}"
        )
    own = run_id_of(place)
    if own is None:
        return None
    found = config_run_id(run_dir)
    if found is not None and found != own:
        return f"{shown} is a checkpoint of run {own}, not of run {found}, the run in {shown_run} (its config.yaml)"
    for sibling in checkpoints_of(place.parent):
        other = run_id_of(sibling)
        if other is not None and other != own:
            return f"{shown} is a checkpoint of run {own}, not of run {other}, the run in {shown_run} ({sibling.name})"
    return None


def check_owner(ckpt: Path, use: str) -> None:
    """Raise :class:`CheckpointError` when ``ckpt`` is not a checkpoint of the run it was found in
    (:func:`owner_problem`); ``use`` ends the message with what the caller may do instead."""
    problem = owner_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f"{problem}: refused, so that no run is continued or scored with another run's weights. "
                              f"{use}")  # fmt: skip


def resolve_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory from ``path``: a model directory itself (it has ``config.json``),
    or a checkpoint named as :func:`find_checkpoint` accepts (a run directory, ``checkpoints/latest``).

    Raises FileNotFoundError when ``path`` is none of these, and :class:`CheckpointError` when its weights or
    configuration are damaged (:func:`check_checkpoint`; the optimizer state is not needed here) or when the
    checkpoint is another run's, reached through a link or copied into the run (:func:`check_owner`).
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        found = path
    else:
        try:
            found = find_checkpoint(path)
        except FileNotFoundError:
            found = None
    if found is not None:
        if (found / STATE_FILE).is_file():
            real = found.resolve()
            check_owner(found, f"To use that checkpoint, name it: {real}" if real != found.absolute() else
                        "Move it out of this run's checkpoints/ directory and name it where it is")  # fmt: skip
        return check_checkpoint(found, optimizer=False)
    if not path.exists():
        raise FileNotFoundError(
            f"--model {str(path)!r} is not a directory (expected a local Hugging Face model directory, "
            "a drgrpo run directory or one of its checkpoints)"
        )
    raise FileNotFoundError(
        f"--model {str(path)!r} is neither a Hugging Face model directory (no config.json) nor a drgrpo run "
        "or checkpoint: expected a directory written by save_pretrained (config.json, weights, tokenizer files), "
        "a run directory, its checkpoints/latest, or a checkpoint directory"
    )


def read_state(ckpt: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (:class:`CheckpointError` naming the file when it is damaged)."""
    path = Path(ckpt) / STATE_FILE
    state, problem = _read_json(path)
    if problem is not None:
        raise CheckpointError(problem)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} is not a drgrpo trainer state (expected a JSON object with an integer 'step')")
    return state


def load_optimizer_state(ckpt: str | Path, device: torch.device) -> dict[str, Any]:
    """The optimizer state dict of a checkpoint, read without unpickling code (``weights_only=True``).

    Raises ValueError naming the file when it holds anything else than tensors and plain data.
    """
    path = Path(ckpt) / OPTIMIZER_FILE
    problem = _torch_file_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds more than tensors and plain data (refused: loading it could run code). "
            f"Only load checkpoints you trust; this one was not written by drgrpo. ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise ValueError(f"{path} is not an optimizer state dict (expected the keys 'state' and 'param_groups')")
    return state


def config_state(train_config: TrainConfig, loss_config: LossConfig, **extra: Any) -> dict[str, Any]:
    """The JSON part of a checkpoint: the train config, the resolved loss config and ``extra``."""
    return {"train_config": train_config.to_dict(), "loss_config": dataclasses.asdict(loss_config), **extra}


# ----------------------------------------------------------------------------- is a checkpoint whole?


def checkpoint_problem(ckpt: str | Path, optimizer: bool = True) -> str | None:
    """What is wrong with the files of a checkpoint (or of a Hugging Face model directory), or None.

    Cheap: no tensor is read. The JSON files must parse; every safetensors file must be as long as its header
    says; ``optimizer.pt`` (checked when ``optimizer``) must be a whole zip archive, as ``torch.save`` writes it.
    A drgrpo checkpoint (it has ``trainer_state.json``) must have its weights and its optimizer state.
    """
    ckpt = Path(ckpt)
    ours = (ckpt / STATE_FILE).exists()
    files = [ckpt / "config.json"] + ([ckpt / STATE_FILE] if ours else [])
    for path in files:
        problem = _json_problem(path)
        if problem is not None:
            return problem
    weights = _weights_files(ckpt)
    if ours and not weights:
        return f"{ckpt / WEIGHTS_FILE} is missing"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem is not None:
            return problem
    if ours and optimizer:
        return _torch_file_problem(ckpt / OPTIMIZER_FILE)
    return None


def check_checkpoint(ckpt: str | Path, optimizer: bool = True) -> Path:
    """``ckpt`` if its files are whole (:func:`checkpoint_problem`), else :class:`CheckpointError`: the file, what is
    wrong with it, and the newest intact checkpoint of the same run."""
    ckpt = Path(ckpt)
    problem = checkpoint_problem(ckpt, optimizer)
    if problem is None:
        return ckpt
    intact = newest_intact(ckpt.parent, optimizer, skip=ckpt)
    hint = f"the newest intact checkpoint is {intact}" if intact else f"no intact checkpoint in {ckpt.parent}"
    raise CheckpointError(f"{problem}; {hint}")


def _weights_files(model_dir: Path) -> list[Path]:
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return [index]  # reported by _safetensors_problem as a damaged header
        return [model_dir / name for name in shards]
    return [model_dir / WEIGHTS_FILE] if (model_dir / WEIGHTS_FILE).exists() else []


def _json_problem(path: Path) -> str | None:
    return _read_json(path)[1]


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(the parsed file, None), or (None, what is wrong with it: missing, not UTF-8, not JSON)."""
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        return json.loads(path.read_text()), None
    except UnicodeDecodeError:
        return None, f"{path} is damaged (not UTF-8 text)"
    except ValueError as exc:
        return None, f"{path} is cut off or damaged (not valid JSON: {exc})"


def _safetensors_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty"
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else size
        if 8 + header_len > size:
            return f"{path} is cut off or damaged ({size} bytes, shorter than its own header)"
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return f"{path} is damaged (its safetensors header is not valid)"
    expected = 8 + header_len + end
    if size < expected:
        return f"{path} is cut off ({size} of the {expected} bytes its header describes)"
    if size > expected:
        return f"{path} is damaged ({size} bytes where its header describes {expected})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size == 0:
        return f"{path} is empty"
    if not zipfile.is_zipfile(path):
        return f"{path} is cut off or damaged (not a whole torch.save archive)"
    return None
