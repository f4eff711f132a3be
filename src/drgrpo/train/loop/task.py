r"""The built-in verifiable task: integer addition with an exact-match reward.

A prompt is two zero-padded operands written digit by digit (``"3 7 + 0 5 ="``), a completion the digits of the
sum with zero or more working tokens ``"."`` after the answer (or before it), so a completion's length can vary
independently of its correctness; the ``answer_noise`` variant samples mistakes the model could see in its own
prefix. :class:`TaskConfig`, the splits (disjoint operand pairs from one seed), the reward :func:`exact_match` and
the warm start's supervised pairs. Why the task is built this way for the length-bias experiment:
docs/design.md, section 9.7.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from drgrpo.train.train_config import TaskConfig

WORK_TOKEN = "."
"""The working token: filler a completion may emit before its answer."""


def _digits(n: int, width: int | None = None) -> str:
    s = str(n) if width is None else str(n).zfill(width)
    return " ".join(s)


def make_example(a: int, b: int, config: TaskConfig) -> dict[str, Any]:
    """One example: ``{"prompt", "answer", "a", "b"}`` (the answer as a decimal string)."""
    w = config.width
    return {"prompt": f"{_digits(a, w)} + {_digits(b, w)} =", "answer": str(a + b), "a": a, "b": b}


def make_splits(config: TaskConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All operand pairs, shuffled with ``config.seed``, split into (train, held-out)."""
    pairs = [(a, b) for a in range(config.max_operand + 1) for b in range(config.max_operand + 1)]
    random.Random(config.seed).shuffle(pairs)
    held_out = [make_example(a, b, config) for a, b in pairs[: config.num_eval]]
    train = [make_example(a, b, config) for a, b in pairs[config.num_eval :]]
    return train, held_out


def format_completion(answer: str, num_work: int, work_position: str = "after") -> str:
    """The completion text: ``answer``'s digits and ``num_work`` working tokens (after or before it)."""
    work, digits = [WORK_TOKEN] * num_work, list(answer)
    return " ".join(digits + work if work_position == "after" else work + digits)


def parse_answer(completion: str) -> str | None:
    """The answer of a completion, or ``None`` if it is not ``[.]* digits [.]*``.

    Working tokens may come before or after the answer (not inside it). Tokens are
    whitespace-separated; the digits may be split over several tokens (``"4 2"`` and
    ``"42"`` both read as ``"42"``).
    """
    tokens = completion.split()
    lo, hi = 0, len(tokens)
    while lo < hi and tokens[lo] == WORK_TOKEN:
        lo += 1
    while hi > lo and tokens[hi - 1] == WORK_TOKEN:
        hi -= 1
    digits = tokens[lo:hi]
    if not digits or not all(t.isascii() and t.isdigit() for t in digits):
        return None
    return "".join(digits)


def count_work(completion: str) -> int:
    """Number of working tokens in a completion."""
    return sum(t == WORK_TOKEN for t in completion.split())


def exact_match(completion: str, example: dict[str, Any]) -> float:
    """Reward: 1.0 if the completion's answer equals ``example["answer"]``, else 0.0.

    Working tokens around the answer are allowed and ignored; anything else (a missing
    answer, a stray symbol, a working token inside the number, a leading zero the true
    answer lacks) scores 0.
    """
    return 1.0 if parse_answer(completion) == str(example["answer"]) else 0.0


NOISE_SYMBOL = "-"
"""What replaces the last digit of a warm-start answer under ``noise_kind="symbol"``."""


def corrupt_last_digit(answer: str, rng: random.Random, kind: str = "digit") -> str:
    """``answer`` with its last digit replaced: by one of the 9 other digits, uniformly (``"digit"``), or by
    :data:`NOISE_SYMBOL` (``"symbol"``)."""
    if kind == "symbol":
        return answer[:-1] + NOISE_SYMBOL
    wrong = rng.choice([d for d in "0123456789" if d != answer[-1]])
    return answer[:-1] + wrong


def sft_pairs(examples: list[dict[str, Any]], config: TaskConfig, rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless (prompt, completion) pairs for the warm start, with a random working length.

    With ``config.answer_noise > 0``, that share of the completions (drawn independently of the working
    length) carries a wrong last digit (:func:`corrupt_last_digit`); without it the random draws are the
    same as they always were, so earlier warm starts are reproduced to the bit.
    """
    while True:
        ex = examples[rng.randrange(len(examples))]
        answer = ex["answer"]
        num_work = rng.randint(0, config.max_work)
        if config.answer_noise > 0 and rng.random() < config.answer_noise:
            answer = corrupt_last_digit(answer, rng, config.noise_kind)
        yield ex["prompt"], format_completion(answer, num_work, config.work_position)


def write_jsonl(examples: list[dict[str, Any]], path: str | Path) -> Path:
    """Write examples as JSON lines (the dataset format ``drgrpo train --dataset`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return path


def task_config_dict(config: TaskConfig) -> dict[str, Any]:
    return asdict(config)
