"""Fixtures shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted tiny run every fault scenario must end as: 6 steps, a checkpoint every 2 (``STEPS`` of
    helpers/cli_runs.py), the built-in task and model. Read it, never write into it (copy it first)."""
    from drgrpo.train.cli.main import main
    from helpers.cli_runs import STEPS, TINY

    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 0
    return run
