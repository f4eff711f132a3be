"""Seeds: every random choice of a run is a function of (seed, step, rank), so a run resumes exactly.

The trainer reseeds python, numpy and torch at the start of every step from ``(seed, step,
rank)``; the prompts of a step are drawn from ``(seed, step)`` (the same on every process, which
then takes its own slice); evaluations sample from ``(seed, EVAL_STREAM, rank)`` inside a forked
generator. Nothing else draws random numbers, so a checkpoint needs no random-number state.
"""

from __future__ import annotations

import random

import numpy as np
import torch

EVAL_STREAM = 7919
"""The second seed part of evaluation sampling (a constant no step number reaches in practice)."""
PROMPT_STREAM = -1
"""The third seed part of the prompt draw, which must not depend on the rank."""


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, step, rank, ...), mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed python, numpy and torch for one step of one process."""
    s = derive_seed(seed, step, rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def prompt_rng(seed: int, step: int) -> random.Random:
    """The generator of a step's prompt draw: the same on every process."""
    return random.Random(derive_seed(seed, step, PROMPT_STREAM))
