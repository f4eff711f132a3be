"""Prompts and rewards: JSONL datasets and reward callables ``(completion, example) -> float``.

Everything here fails early with an error that names the file, line, field or example.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drgrpo.distributed import any_process
from drgrpo.train.seeds import prompt_rng
from drgrpo.train.task import TaskConfig, make_splits

Example = dict[str, Any]
RewardFn = Callable[[str, Example], float]


LIMIT_TEXT = "the largest reward whose advantages the loss's dtype holds"
"""Why a reward has a limit (:meth:`Rewards.__call__`), in error messages."""


class RewardError(RuntimeError):
    """A reward function raised, or returned something that is not a finite number."""


def load_jsonl(
    path: str | Path,
    prompt_field: str = "prompt",
    check_prompt: Callable[[Any], str | None] | None = None,
    flag: str = "--dataset",
) -> list[Example]:
    """Read a JSONL dataset; every line must be a JSON object with a non-empty ``prompt_field``.

    ``check_prompt(prompt)`` returns what is wrong with a prompt (too long for the model, say), or None
    (:class:`drgrpo.train.preflight.PromptCheck`). Every error is a ValueError naming the file and the line
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
        self,
        completions: Sequence[str],
        examples: Sequence[Example],
        indices: Sequence[int],
        limit: float = math.inf,
    ) -> tuple[list[float], list[float]]:
        """(total weighted reward, first reward) per completion, as Python floats (float64); raises
        :class:`RewardError` on a bad value.

        ``indices`` are the examples' positions in their dataset, used in error messages with the completion's
        position in ``completions``. ``limit``: the largest magnitude a reward and a total may have (the range of
        the dtype the advantages are computed in; beyond it they would become infinite).
        """
        totals, firsts = [], []
        for position, (completion, ex, idx) in enumerate(zip(completions, examples, indices, strict=True)):
            total = 0.0
            for k, (name, fn, w) in enumerate(zip(self.names, self.fns, self.weights, strict=True)):
                value = call_reward(name, fn, completion, ex, idx, position, limit)
                total += w * value
                if k == 0:
                    firsts.append(value)
            if not (math.isfinite(total) and abs(total) <= limit):
                terms = " + ".join(f"{w} * {n}" for n, w in zip(self.names, self.weights, strict=True))
                why = f"beyond {limit:.3g}, {LIMIT_TEXT}" if math.isfinite(total) else "not a finite number"
                raise RewardError(
                    f"the weighted reward {terms} is {total}, {why}, on example {_describe(ex, idx)} with "
                    f"{_completion(completion, position)}; scale the rewards or --reward-weights down"
                )
            totals.append(total)
        return totals, firsts


def score(
    rewards: Rewards,
    completions: Sequence[str],
    examples: Sequence[Example],
    indices: Sequence[int],
    limit: float = math.inf,
) -> tuple[list[float], list[float]]:
    """``rewards(completions, examples, indices, limit)`` agreed across processes: if any process's reward fails,
    every process raises (the failing one its own :class:`RewardError`), so none waits forever in the
    step's next collective operation.
    """
    try:
        totals, firsts = rewards(completions, examples, indices, limit)
        failure: RewardError | None = None
    except RewardError as exc:
        failure = exc
    if any_process(failure is not None):
        raise failure or RewardError("a reward raised on another process (see its error); every process stopped")
    return totals, firsts


def call_reward(
    name: str,
    fn: RewardFn,
    completion: str,
    example: Example,
    index: int | None = None,
    position: int | None = None,
    limit: float = math.inf,
) -> float:
    """``fn(completion, example)`` as a finite float of magnitude at most ``limit``, or a :class:`RewardError`
    naming the reward, the example (``index``: its position in the dataset) and the completion (``position``: its
    row in the batch)."""
    where = f"on example {_describe(example, index)} with {_completion(completion, position)}"
    try:
        value = fn(completion, example)
    except Exception as exc:
        raise RewardError(f"reward {name} raised {type(exc).__name__}: {exc} {where}") from exc
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward {name} returned {reprlib.repr(value)} ({type(value).__name__}), expected a float, {where}"
        )
    try:
        value = float(value)
    except OverflowError:
        raise RewardError(
            f"reward {name} returned {reprlib.repr(value)} ({type(value).__name__}), too large for a float, {where}"
        ) from None
    if not math.isfinite(value):
        raise RewardError(f"reward {name} returned {value} (not finite) {where}")
    if abs(value) > limit:
        raise RewardError(
            f"reward {name} returned {value:.6g}, beyond {limit:.3g}, {LIMIT_TEXT}, {where}; scale the reward down"
        )
    return value


def _completion(completion: str, position: int | None) -> str:
    return (
        f"completion {position} of the batch, {completion!r}" if position is not None else f"completion {completion!r}"
    )


def _describe(example: Example, index: int | None) -> str:
    text = json.dumps(example, default=str)
    if len(text) > 200:
        text = text[:200] + "...}"
    return f"#{index} {text}" if index is not None else text
