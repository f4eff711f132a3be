"""Shared test set-up: torch's threads, and the collector frozen after collection.

Torch gets at most two threads, and one per worker's share of the cores under pytest-xdist (``-n logical`` on 2
cores: 2 workers of 1 thread each). ``OMP_NUM_THREADS`` says the same to the processes the tests start, unless it
is set already: more threads than cores make them wait for each other (docs/testing.md gives the figures).

The shared helpers (``tests/helpers/``, ``batches``, ``verl_env``) and the code shared with the benchmarks
(``benchmarks/trl_harness.py``, ``gloo_ranks.py``) are importable from every folder through ``pythonpath`` in
pyproject.toml's ``[tool.pytest.ini_options]``.
"""

import gc
import os

import torch

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, torch.get_num_threads(), (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def pytest_collection_modifyitems(config, items):
    """Modules with the most ``slow`` tests run first, each module's tests together and in their own order.

    pytest-xdist hands tests out in this order: the long ones (processes, end-to-end runs) start early and the
    many quick ones fill both workers at the end, instead of one worker finishing a long test alone. A module's
    tests stay together, so its module fixtures are made once. The order depends only on the collected tests,
    the same in every worker (xdist checks that)."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow = {name: sum(item.get_closest_marker("slow") is not None for item in group) for name, group in modules.items()}
    order = sorted(modules, key=lambda name: -slow[name])  # a stable sort: equal counts keep the collection order
    items[:] = [item for name in order for item in modules[name]]


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
