"""Checkpoints: a Hugging Face model directory plus what is needed to continue exactly, written atomically.

Layout of ``RUN/checkpoints/step_000120/``::

    config.json, model.safetensors, generation_config.json, tokenizer files   (save_pretrained:
                                                      loadable by ``--model`` and ``drgrpo eval``)
    optimizer.pt        the optimizer's state dict (tensors and numbers only: read with weights_only=True)
    trainer_state.json  step, the TrainConfig, the resolved LossConfig, the initial model

and ``RUN/checkpoints/latest``, a one-line file naming the newest checkpoint. No random-number
state is saved: every step reseeds from ``(seed, step, rank)`` (:mod:`drgrpo.train.seeds`), so the
weights, the optimizer and the step are the whole state of a run.

Atomicity: a checkpoint is written into a temporary directory and renamed into place, then
``latest`` is replaced with ``os.replace``. A process killed at any moment leaves either the old
checkpoint or the new one, never a half-written one; :func:`clean_stale` removes what a killed
write left behind, and restores a checkpoint whose replacement was cut short.

Nothing is unpickled: the weights are safetensors, the optimizer state is read with
``torch.load(..., weights_only=True)`` (a file carrying anything but tensors, numbers, strings,
lists and dicts is refused with an error), and the rest is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write ``root/step_{step:06d}`` atomically and point ``root/latest`` at it; returns its path.

    ``state`` (JSON-serialisable: the configs, the initial model, the world size) goes into
    ``trainer_state.json`` beside ``step``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_files(tmp, step, model, tokenizer, optimizer, state)
    publish(tmp, final)
    point_latest(root, final)
    return final


def save_run_checkpoint(
    out_dir: Path, step: int, state: Any, extra_state: dict[str, Any], rank: int, barrier: bool = True
) -> Path | None:
    """The trainer's save: rank 0 writes ``out_dir/checkpoints/step_N`` from ``state`` (a TrainState), then every
    process waits for it (``barrier``). Returns the checkpoint on rank 0, None elsewhere."""
    path = None
    if rank == 0:
        path = save_checkpoint(
            out_dir / "checkpoints", step, state.model, state.tokenizer, state.optimizer, extra_state
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
    """Remove what killed writes left in ``root`` (temporary directories and files); returns what was removed.

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
    for tmp in sorted(root.glob(".tmp_*")) + sorted(root.glob(".latest_*")):
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
        removed.append(tmp)
    return removed


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint named by ``path``: a checkpoint directory, a run directory, its ``checkpoints/``
    directory, or a ``latest`` file.

    A run directory (or ``checkpoints/``) gives the checkpoint ``latest`` names, or the newest
    ``step_*`` when ``latest`` is missing or names a checkpoint that is not there.
    """
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        path = path.parent
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            ckpt = root / latest.read_text().strip()
            if (ckpt / STATE_FILE).is_file():
                return ckpt
        steps = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
        if steps:
            return steps[-1]
    raise FileNotFoundError(
        f"no checkpoint under {str(path)!r}: expected a run directory with checkpoints/latest, "
        f"its checkpoints/latest file, or a checkpoint directory containing {STATE_FILE}"
    )


def resolve_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory from ``path``: a model directory itself (it has ``config.json``),
    or a checkpoint named as :func:`find_checkpoint` accepts (a run directory, ``checkpoints/latest``).

    Raises FileNotFoundError when ``path`` is none of these.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    try:
        return find_checkpoint(path)
    except FileNotFoundError:
        pass
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
    """The ``trainer_state.json`` of a checkpoint."""
    return dict(json.loads((Path(ckpt) / STATE_FILE).read_text()))


def load_optimizer_state(ckpt: str | Path, device: torch.device) -> dict[str, Any]:
    """The optimizer state dict of a checkpoint, read without unpickling code (``weights_only=True``).

    Raises ValueError naming the file when it holds anything else than tensors and plain data.
    """
    path = Path(ckpt) / OPTIMIZER_FILE
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


def config_state(train_config: Any, loss_config: Any, **extra: Any) -> dict[str, Any]:
    """The JSON part of a checkpoint: the train config, the resolved loss config and ``extra``."""
    return {"train_config": train_config.to_dict(), "loss_config": dataclasses.asdict(loss_config), **extra}
