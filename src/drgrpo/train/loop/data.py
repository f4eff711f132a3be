"""Prompts: JSONL datasets, the built-in task's splits, and each step's share of them.

Everything here fails early with an error that names the file, line or field. The reward callables live in
:mod:`drgrpo.train.loop.rewards` (their names are imported here too, for older imports).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from drgrpo.train.loop.rewards import LIMIT_TEXT, Example, RewardError, RewardFn, Rewards, call_reward, load_reward
from drgrpo.train.loop.seeds import prompt_rng
from drgrpo.train.loop.task import TaskConfig, make_splits

__all__ = [
    "LIMIT_TEXT",
    "Example",
    "RewardError",
    "RewardFn",
    "Rewards",
    "call_reward",
    "load_examples",
    "load_jsonl",
    "load_reward",
    "prompts_for_step",
]


def load_jsonl(
    path: str | Path,
    prompt_field: str = "prompt",
    check_prompt: Callable[[Any], str | None] | None = None,
    flag: str = "--dataset",
) -> list[Example]:
    """Read a JSONL dataset; every line must be a JSON object with a non-empty ``prompt_field``.

    ``check_prompt(prompt)`` returns what is wrong with a prompt (too long for the model, say), or None
    (:class:`drgrpo.train.loop.setup.PromptCheck`). Every error is a ValueError naming the file and the line
    (``flag`` names the flag that gave the file when it is missing or a directory).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; expected a JSONL file (one JSON object per line)")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist (expected a JSONL file)")
    examples: list[Example] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:  # a byte order mark on the first line is not part of the JSON
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the "
                    "line); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(ex, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(ex).__name__}")
            if prompt_field not in ex:
                raise ValueError(
                    f"{path}:{lineno}: no {prompt_field!r} field (fields: {sorted(ex)}); "
                    f"set --prompt-field to the field holding the prompt"
                )
            prompt = ex[prompt_field]
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
                raise ValueError(
                    f"{path}:{lineno}: field {prompt_field!r} must be a string or a list of chat messages, "
                    f"got {type(prompt).__name__}"
                )
            if not prompt or (isinstance(prompt, str) and not prompt.strip()):
                raise ValueError(f"{path}:{lineno}: the prompt ({prompt_field!r}) is empty")
            problem = check_prompt(prompt) if check_prompt is not None else None
            if problem is not None:
                raise ValueError(f"{path}:{lineno}: {problem}")
            examples.append(ex)
    if not examples:
        raise ValueError(f"{flag} {str(path)!r} has no examples")
    return examples


def load_examples(
    dataset: str | None,
    eval_dataset: str | None,
    prompt_field: str,
    task: TaskConfig,
    check_prompt: Callable[[Any], str | None] | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: the JSONL files given (every prompt checked by ``check_prompt``, see
    :func:`load_jsonl`), or the built-in task's splits.

    With ``dataset`` and no ``eval_dataset`` there is no held-out set (an empty list).
    """
    held_out: list[Example] = []
    if dataset is not None:
        train = load_jsonl(dataset, prompt_field, check_prompt, "--dataset")
    else:
        train, held_out = make_splits(task)
    if eval_dataset:
        held_out = load_jsonl(eval_dataset, prompt_field, check_prompt, "--eval-dataset")
    return train, held_out


def prompts_for_step(
    examples: Sequence[Example], prompts_per_step: int, seed: int, step: int, rank: int, world: int
) -> tuple[list[Example], list[int]]:
    """This process's share of a step's prompts, and their positions in ``examples``.

    Every process draws the same ``prompts_per_step`` positions without replacement from ``(seed, step)``
    (repeating the draw when the dataset is smaller), then takes its contiguous slice of
    ``prompts_per_step / world``: the processes' prompts are disjoint and together the step's.
    """
    order = prompt_rng(seed, step).sample(range(len(examples)), min(prompts_per_step, len(examples)))
    order = (order * prompts_per_step)[:prompts_per_step]  # tiny datasets: repeat the draw
    per_process = prompts_per_step // world
    mine = order[rank * per_process : (rank + 1) * per_process]
    return [examples[i] for i in mine], mine
