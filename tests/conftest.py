"""Shared test set-up: at most two threads for torch in the test process.

The shared helpers (``tests/helpers/``, ``batches``, ``verl_env``) and the code shared with the benchmarks
(``benchmarks/trl_harness.py``, ``gloo_ranks.py``) are importable from every folder through ``pythonpath`` in
pyproject.toml's ``[tool.pytest.ini_options]``.
"""

import gc

import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_finish(session):
    """Once every test module is imported: collect, then freeze what is left (``gc.freeze``).

    transformers' ``Trainer.train`` starts with ``accelerator.free_memory()``, a full ``gc.collect()``; with torch,
    transformers and TRL imported, each such collection walked every module-level object: about half of a tiny TRL
    run's time. Frozen objects are skipped by the collector; what the tests create later is collected as before.
    ``pytest_unconfigure`` unfreezes them, so that the interpreter's shutdown frees them as usual.
    """
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    gc.unfreeze()
