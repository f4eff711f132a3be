"""Shared test set-up: make ``tests/`` (for ``batches``, ``verl_env``) and ``benchmarks/`` (for ``gloo_ranks``,
``trl_harness``, shared with the benchmark scripts) importable from every sub-folder."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
