"""Directories made once per test session and read by every pytest-xdist worker: a model, a reference run.

A session fixture alone is made once per worker; :func:`shared_dir` makes it once for all of them. The first
worker to ask makes it under a file lock in the session's temporary directory (the workers' common parent); the
others wait for the lock, then read what it made. Callers read a shared directory, never write into it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The directory ``name`` of this test session, made by ``make(path)`` the first time any worker asks.

    A ``make`` that raised leaves no directory behind: the next request tries again (and fails the same way)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed make left
            make(path)
            done.touch()
    return path


def default_warm_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model's default warm start (``WarmStartConfig()`` on ``TaskConfig()``), made as ``drgrpo
    train`` makes it (one thread), leaving the caller's threads and random state as they were."""
    from drgrpo.train import TaskConfig, WarmStartConfig, warm_start

    def make(path: Path) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                warm_start(path, WarmStartConfig(), TaskConfig())
        finally:
            torch.set_num_threads(threads)

    return shared_dir(tmp_path_factory, "default-warm-start", make)
