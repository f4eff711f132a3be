"""Checkpoints: a Hugging Face model directory plus everything needed to continue exactly.

Layout of ``DIR/checkpoints/step_000120/``::

    config.json, model.safetensors, generation_config.json, tokenizer files   (save_pretrained:
                                                       loadable by ``--model`` and ``drgrpo eval``)
    optimizer.pt        AdamW state
    rng_rank{r}.pt      python, numpy and torch RNG states of each process
    trainer_state.json  step, the TrainConfig, the resolved LossConfig

A checkpoint is written to a temporary directory and renamed into place, and ``latest`` is
replaced atomically after it: a crash mid-write never damages the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, step, rank, ...), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    train_config: Any,
    loss_config: Any,
    rng_states: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically and point ``root/latest`` at it; returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for rank, state in enumerate(rng_states):
        torch.save(state, tmp / f"rng_rank{rank}.pt")
    state = {
        "step": step,
        "train_config": train_config.to_dict(),
        "loss_config": dataclasses.asdict(loss_config),
        **(extra or {}),
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    if final.exists():
        old = root / f".old_step_{step:06d}_{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    latest_tmp = root / f".latest_{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its ``checkpoints/`` or the checkpoint itself."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            ckpt = root / latest.read_text().strip()
            if (ckpt / STATE_FILE).is_file():
                return ckpt
        steps = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
        if steps:
            return steps[-1]
    raise FileNotFoundError(
        f"no checkpoint under {str(path)!r}: expected a run directory with checkpoints/latest, "
        f"or a checkpoint directory containing {STATE_FILE}"
    )


def read_state(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def load_rng(ckpt: str | Path, rank: int) -> dict[str, Any] | None:
    path = Path(ckpt) / f"rng_rank{rank}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None
