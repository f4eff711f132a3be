"""Fixtures shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted tiny run every fault scenario must end as: 6 steps, a checkpoint every 2 (``STEPS`` of
    test_faults), the built-in task and model. Read it, never write into it (copy it first)."""
    from test_cli import TINY
    from test_faults import STEPS

    from drgrpo.train.cli import main

    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 0
    return run
