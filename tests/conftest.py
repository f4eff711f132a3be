"""Shared test set-up: at most two threads for torch in the test process.

The shared helpers (``tests/helpers/``, ``batches``, ``verl_env``) and the code shared with the benchmarks
(``benchmarks/trl_harness.py``, ``gloo_ranks.py``) are importable from every folder through ``pythonpath`` in
pyproject.toml's ``[tool.pytest.ini_options]``.
"""

import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
