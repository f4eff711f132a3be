"""Prompts and rewards: JSONL datasets and reward callables ``(completion, example) -> float``.

Everything here fails early with an error that names the file, line, field or example.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drgrpo.train.seeds import prompt_rng
from drgrpo.train.stopping import TimeLimitExceeded, reward_watchdog
from drgrpo.train.task import TaskConfig, make_splits

Example = dict[str, Any]
RewardFn = Callable[[str, Example], float]


class RewardError(RuntimeError):
    """A reward function raised, or returned something that is not a finite number."""


def load_jsonl(path: str | Path, prompt_field: str = "prompt") -> list[Example]:
    """Read a JSONL dataset; every line must be a JSON object with ``prompt_field``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist (expected a JSONL file)")
    examples: list[Example] = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
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
            examples.append(ex)
    if not examples:
        raise ValueError(f"dataset {str(path)!r} has no examples")
    return examples


def load_examples(
    dataset: str | None, eval_dataset: str | None, prompt_field: str, task: TaskConfig
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: the JSONL files given, or the built-in task's splits.

    With ``dataset`` and no ``eval_dataset`` there is no held-out set (an empty list).
    """
    held_out: list[Example] = []
    if dataset is not None:
        train = load_jsonl(dataset, prompt_field)
    else:
        train, held_out = make_splits(task)
    return train, load_jsonl(eval_dataset, prompt_field) if eval_dataset else held_out


def prompts_for_step(
    examples: Sequence[Example], config: Any, step: int, rank: int, world: int
) -> tuple[list[Example], list[int]]:
    """This process's share of a step's prompts, and their positions in ``examples``.

    Every process draws the same ``config.prompts_per_step`` positions without replacement from
    ``(config.seed, step)`` (repeating the draw when the dataset is smaller), then takes its contiguous
    slice of ``prompts_per_step / world``: the processes' prompts are disjoint and together the step's.
    """
    prompts_per_step = config.prompts_per_step
    order = prompt_rng(config.seed, step).sample(range(len(examples)), min(prompts_per_step, len(examples)))
    order = (order * prompts_per_step)[:prompts_per_step]  # tiny datasets: repeat the draw
    per_process = prompts_per_step // world
    mine = order[rank * per_process : (rank + 1) * per_process]
    return [examples[i] for i in mine], mine


def load_reward(spec: str) -> RewardFn:
    """Import ``'package.module:function'`` and check it is callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r} must be 'module:function', e.g. 'drgrpo.train.task:exact_match'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable (got {type(fn).__name__})")
    return fn  # type: ignore[return-value]


@dataclass(frozen=True)
class Rewards:
    """Weighted reward callables; the first is the correctness reward behind ``accuracy``."""

    names: tuple[str, ...]
    fns: tuple[RewardFn, ...]
    weights: tuple[float, ...]

    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Sequence[float] = ()) -> Rewards:
        specs = tuple(specs) or ("drgrpo.train.task:exact_match",)
        weights = tuple(float(w) for w in weights) or (1.0,) * len(specs)
        if len(weights) != len(specs):
            raise ValueError(f"{len(weights)} reward weights for {len(specs)} rewards; give one weight per reward")
        return cls(specs, tuple(load_reward(s) for s in specs), weights)

    def __call__(
        self, completions: Sequence[str], examples: Sequence[Example], indices: Sequence[int]
    ) -> tuple[list[float], list[float]]:
        """(total weighted reward, first reward) per completion; raises :class:`RewardError` on a bad value.

        ``indices`` are the examples' positions in their dataset, used in error messages.
        """
        totals, firsts = [], []
        for completion, ex, idx in zip(completions, examples, indices, strict=True):
            total = 0.0
            for k, (name, fn, w) in enumerate(zip(self.names, self.fns, self.weights, strict=True)):
                value = call_reward(name, fn, completion, ex, idx)
                total += w * value
                if k == 0:
                    firsts.append(value)
            totals.append(total)
        return totals, firsts


def call_reward(name: str, fn: RewardFn, completion: str, example: Example, index: int | None = None) -> float:
    """``fn(completion, example)`` as a finite float, or a :class:`RewardError` naming the example.

    Within a run with ``--reward-timeout`` the call is bounded (:class:`~drgrpo.train.stopping.Watchdog`): a call
    past the limit is abandoned with a :class:`RewardError` naming the reward and the limit.
    """
    watchdog = reward_watchdog()
    try:
        if watchdog is None:
            value = fn(completion, example)
        else:
            with watchdog.timing():
                value = fn(completion, example)
    except TimeLimitExceeded:
        seconds = watchdog.seconds if watchdog is not None else 0.0
        raise RewardError(
            f"reward {name} ran longer than --reward-timeout {seconds:g} s on example {_describe(example, index)} "
            f"with completion {completion!r}; the call was abandoned"
        ) from None
    except Exception as exc:
        raise RewardError(
            f"reward {name} raised {type(exc).__name__}: {exc} on example {_describe(example, index)} "
            f"with completion {completion!r}"
        ) from exc
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward {name} returned {value!r} ({type(value).__name__}), expected a float, on example "
            f"{_describe(example, index)} with completion {completion!r}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(
            f"reward {name} returned {value} (not finite) on example {_describe(example, index)} "
            f"with completion {completion!r}"
        )
    return value


def _describe(example: Example, index: int | None) -> str:
    text = json.dumps(example, default=str)
    if len(text) > 200:
        text = text[:200] + "...}"
    return f"#{index} {text}" if index is not None else text
