"""Fixtures shared by the trainer tests, each made once per session for every xdist worker (``helpers.shared_dirs``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted tiny run every fault scenario must end as: 6 steps, a checkpoint every 2 (``STEPS`` of
    helpers/cli_runs.py), the built-in task and model. Read it, never write into it (copy it first)."""
    from drgrpo.train.cli.main import main
    from helpers.cli_runs import STEPS, TINY
    from helpers.shared_dirs import shared_dir

    def make(run: Path) -> None:
        assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 0

    return shared_dir(tmp_path_factory, "reference-run", make)


@pytest.fixture(scope="session")
def tiny_warm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The warm start of the tiny settings (``TINY_WARM`` on ``TINY_TASK``, helpers/tiny_configs.py), made once:
    a model directory to pass as ``model``. Read it, never write into it."""
    from drgrpo.train.loop.warmstart import warm_start
    from helpers.shared_dirs import shared_dir
    from helpers.tiny_configs import TINY_TASK, TINY_WARM

    return shared_dir(tmp_path_factory, "tiny-warm-model", lambda path: warm_start(path, TINY_WARM, TINY_TASK))
