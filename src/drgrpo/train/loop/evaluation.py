"""Held-out evaluation: accuracy and the lengths of correct and incorrect completions.

:func:`held_out_metrics` is what the trainer logs every ``eval_every`` steps; :func:`evaluate_model`
is ``drgrpo eval --model DIR``: it loads a checkpoint (or any local model, or a run's latest
checkpoint) and evaluates it on the held-out split it was trained with, or on a JSONL file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from drgrpo.train.loop.data import Example, Rewards, load_examples
from drgrpo.train.loop.metrics import (
    accuracy_metrics,
    correctness_sums,
    length_sums,
    mean_or_none,
    sum_across_processes,
)
from drgrpo.train.loop.model import load_model, load_tokenizer
from drgrpo.train.loop.rollout import generate, prompt_texts
from drgrpo.train.loop.seeds import EVAL_STREAM, derive_seed
from drgrpo.train.loop.setup import prompt_check
from drgrpo.train.loop.task import TaskConfig
from drgrpo.train.loop.warmstart import MARKER
from drgrpo.train.run.checkpoint import STATE_FILE, read_state, resolve_model_dir
from drgrpo.train.run.preflight import check_device
from drgrpo.train.run.stopping import StopOnSignal, agreed
from drgrpo.train.train_config import TrainConfig


def held_out_metrics(
    model: Any, tokenizer: Any, examples: list[Example], rewards: Rewards, config: TrainConfig,
    stop: StopOnSignal | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The trainer's evaluation: greedy (``eval/*``) and, with ``eval_sampled``, at the rollout temperature
    (``eval_sampled/*``: the expected reward RL maximises), on the first ``eval_size`` examples. A signal
    (``stop``) abandons it at once, on every process."""
    examples = examples[: config.eval_size]
    metrics = evaluate(model, tokenizer, examples, rewards, config, stop=stop)
    if config.eval_sampled:
        metrics.update(evaluate(model, tokenizer, examples, rewards, config, temperature=config.temperature,
                                prefix="eval_sampled/", stop=stop))  # fmt: skip
    return metrics


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    rewards: Rewards,
    config: TrainConfig,
    *,
    temperature: float | None = None,
    prefix: str = "eval/",
    batch_prompts: int = 256,
    stop: StopOnSignal | None = None,
) -> dict[str, Any]:
    """Held-out accuracy and lengths: one completion per prompt at ``temperature``
    (default ``config.eval_temperature``; 0 is greedy). Keys start with ``prefix``.

    With several processes each evaluates its share and the sums are all-reduced.
    ``accuracy`` is the share of completions the first reward scored 1, when it scored each 0 or 1; otherwise it is
    None and ``reward/NAME`` is that reward's mean (:func:`~drgrpo.train.loop.metrics.accuracy_metrics`). A completion
    counts as correct (for the lengths) when the first reward is >= 0.5. Lengths count completion
    tokens, the end-of-sequence token included; ``frac_truncated`` is the share of completions
    with no end-of-sequence token within ``max_new_tokens``. The generation and the rewards are this process's
    own work (:func:`~drgrpo.train.run.stopping.agreed`): a failure or a signal (``stop``) there stops every process
    before the sums are added; ``stop``'s watchdog bounds each reward call (``--reward-timeout``).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    idx = list(range(rank, len(examples), world))
    local = {"reward": 0.0, **correctness_sums([]), "truncated": 0.0, **length_sums([], [])}
    temp = config.eval_temperature if temperature is None else temperature
    with agreed(stop, device), torch.random.fork_rng(devices=[]):  # sampling never disturbs the training RNG
        torch.manual_seed(derive_seed(config.seed, EVAL_STREAM, rank))
        for lo in range(0, len(idx), batch_prompts):
            chunk = idx[lo : lo + batch_prompts]
            exs = [examples[i] for i in chunk]
            roll = generate(
                model,
                tokenizer,
                prompt_texts([e[config.prompt_field] for e in exs], tokenizer),
                1,
                max_new_tokens=config.max_new_tokens,
                temperature=temp,
                top_p=config.top_p,
            )
            totals, firsts = rewards(roll.texts, exs, chunk, watchdog=stop.watchdog if stop is not None else None)
            part = {"reward": sum(totals), **correctness_sums(firsts), "truncated": float(roll.truncated.sum()),
                    **length_sums(roll.lengths.tolist(), [r >= 0.5 for r in firsts])}  # fmt: skip
            local = {key: local[key] + part[key] for key in local}
    s = sum_across_processes(local, device)
    n = s["completions"]
    return {
        **accuracy_metrics(s, rewards.names[0], prefix),
        f"{prefix}reward": mean_or_none(s["reward"], n),
        f"{prefix}length": mean_or_none(s["length"], n),
        f"{prefix}length_correct": mean_or_none(s["length_correct"], s["num_correct"]),
        f"{prefix}length_incorrect": mean_or_none(s["length_incorrect"], s["num_incorrect"]),
        f"{prefix}frac_truncated": mean_or_none(s["truncated"], n),
        f"{prefix}num_prompts": int(n),
    }


def saved_train_config(model_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig stored with a checkpoint, or the task of a warm start; None for other models."""
    model_dir = Path(model_dir)
    if (model_dir / STATE_FILE).is_file():
        return TrainConfig.from_dict(read_state(model_dir)["train_config"])
    marker = model_dir / MARKER
    if marker.is_file():
        return TrainConfig(task=TaskConfig(**json.loads(marker.read_text())["spec"]["task"]))
    return None


def evaluate_model(model: str | Path, config: TrainConfig | None = None) -> dict[str, Any]:
    """``drgrpo eval``: evaluate a model on held-out prompts, one greedy (or sampled) completion each.

    ``model`` is a local Hugging Face model directory, a checkpoint, a run directory or its
    ``checkpoints/latest`` (:func:`~drgrpo.train.run.checkpoint.resolve_model_dir`). ``config`` supplies the
    dataset, rewards and generation settings; by default the ones the checkpoint was trained with (the
    built-in held-out split for the default run).
    """
    model_dir = resolve_model_dir(model)
    config = config or saved_train_config(model_dir) or TrainConfig()
    rewards = Rewards.from_specs(config.rewards, config.reward_weights)
    if config.dataset and not config.eval_dataset:
        raise ValueError("evaluating a model trained on --dataset needs --eval-dataset FILE.jsonl (held-out prompts)")
    check_device(config.device)
    tokenizer = load_tokenizer(model_dir)  # refuses a model that needs its own Python code
    check = prompt_check(model_dir, config, tokenizer) if config.eval_dataset else None  # empty or too long prompts
    _, examples = load_examples(None, config.eval_dataset, config.prompt_field, config.task, check)  # never train's
    config.apply_torch_settings()  # as in training: deterministic, 1 thread for the built-in tiny model
    net = load_model(model_dir, config.dtype, torch.device(config.device)).eval()
    return {"model": str(model_dir), **evaluate(net, tokenizer, examples[: config.eval_size], rewards, config)}
