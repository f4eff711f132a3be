"""Rewards for examples/data: any callable (completion, example) -> float, named on the command line as module:function.

    PYTHONPATH=examples drgrpo train ... --reward my_rewards:correct --reward my_rewards:digits_only

`completion` is the generated text (the tokenizer's decoding, without the end-of-sequence token), `example` the
dataset line as a dict, with every field of the JSON object. The first reward is the correctness reward behind the
logged accuracy; the others add to it with their --reward-weights.
"""

from __future__ import annotations

from typing import Any


def correct(completion: str, example: dict[str, Any]) -> float:
    """1.0 when the completion's digits, spaces removed, are the example's "answer" (so "4 8" for "48"), else 0.0."""
    return 1.0 if completion.replace(" ", "") == str(example["answer"]) else 0.0


def digits_only(completion: str, example: dict[str, Any]) -> float:
    """A format reward: 1.0 when the completion is one to three digits and nothing else, else 0.0."""
    tokens = completion.split()
    return 1.0 if 1 <= len(tokens) <= 3 and all(t.isascii() and t.isdigit() for t in tokens) else 0.0
