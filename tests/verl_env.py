"""verl's own numbers for the verl tests, computed once per session in ``.venv-verl``'s interpreter.

verl 0.9.1 pins ``transformers<5.11``, so it lives in its own virtual environment beside ``.venv``
(``bash scripts/setup.sh train,peers,dev,verl`` makes both). ``live()`` runs
``tests/verl_live/run_checks.py`` there once (about 10 s, mostly ``import verl``) and returns its
results: inputs and verl's outputs, which the tests compare with drgrpo computed here. A missing
``.venv-verl`` fails the tests that need it: these checks must run in CI.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-verl" / "bin" / "python"
RUNNER = ROOT / "tests" / "verl_live" / "run_checks.py"
SETUP = "bash scripts/setup.sh train,peers,dev,verl (or only the verl environment: bash scripts/setup_verl.sh)"

_CACHE: dict[str, Any] = {}

MEASURED: list[str] = []
"""Lines the verl tests report at the end of the session (``tests/integrations/conftest.py`` prints them)."""


def live() -> dict:
    """The runner's results (a dict of tensors and strings); fails the calling test if they cannot be had."""
    if "results" not in _CACHE and "error" not in _CACHE:
        _CACHE.update(_run())
    if "error" in _CACHE:
        pytest.fail(_CACHE["error"], pytrace=False)
    return _CACHE["results"]


def _run() -> dict[str, Any]:
    if not PYTHON.exists():
        return {"error": f"the verl environment {PYTHON.parent.parent} is missing; create it with: {SETUP}"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_USE_EXTERNAL", "PYTHONPATH"))}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "verl-live.pt"
        proc = subprocess.run(
            [str(PYTHON), str(RUNNER), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            return {"error": f"{RUNNER.name} failed in {PYTHON} (exit {proc.returncode}); set up with: {SETUP}\n{tail}"}
        return {"results": torch.load(out, weights_only=False)}
