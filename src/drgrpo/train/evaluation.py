"""Held-out evaluation: accuracy and the lengths of correct and incorrect completions.

:func:`evaluate` is what the trainer calls every ``eval_every`` steps; :func:`evaluate_model`
is ``drgrpo eval --model DIR``: it loads a checkpoint (or any local model) and evaluates it on
the built-in held-out split or a JSONL file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from drgrpo.train.checkpoint import derive_seed
from drgrpo.train.config import TrainConfig
from drgrpo.train.data import Example, Rewards, load_jsonl
from drgrpo.train.metrics import length_stats, mean_or_none, sum_across_processes
from drgrpo.train.model import check_model_dir, load_model, load_tokenizer
from drgrpo.train.rollout import generate, prompt_texts
from drgrpo.train.task import TaskConfig, make_splits


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
) -> dict[str, Any]:
    """Held-out accuracy and lengths: one completion per prompt at ``temperature``
    (default ``config.eval_temperature``; 0 is greedy). Keys start with ``prefix``.

    With several processes each evaluates its share and the sums are all-reduced.
    ``accuracy`` is the mean of the first reward (the correctness reward, expected in [0, 1]);
    a completion counts as correct when that reward is >= 0.5. Lengths count completion
    tokens, the end-of-sequence token included; ``frac_truncated`` is the share of completions
    with no end-of-sequence token within ``max_new_tokens``.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    idx = list(range(rank, len(examples), world))
    sums = [0.0] * 10  # total reward, first reward, count, truncated, then length_stats
    chat = bool(getattr(tokenizer, "chat_template", None))
    temp = config.eval_temperature if temperature is None else temperature
    with torch.random.fork_rng(devices=[]):  # sampling here never disturbs the training RNG
        torch.manual_seed(derive_seed(config.seed, 7919, rank))
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
                chat=chat,
            )
            totals, firsts = rewards(roll.texts, exs, chunk)
            stats = length_stats(roll.lengths.tolist(), [r >= 0.5 for r in firsts])
            part = [sum(totals), sum(firsts), len(exs), float(roll.truncated.sum()), *stats]
            sums = [a + b for a, b in zip(sums, part, strict=True)]
    total, first, n, cut, len_sum, len_n, lc, nc, li, ni = sum_across_processes(sums, device)
    return {
        f"{prefix}accuracy": mean_or_none(first, n),
        f"{prefix}reward": mean_or_none(total, n),
        f"{prefix}length": mean_or_none(len_sum, len_n),
        f"{prefix}length_correct": mean_or_none(lc, nc),
        f"{prefix}length_incorrect": mean_or_none(li, ni),
        f"{prefix}frac_truncated": mean_or_none(cut, n),
        f"{prefix}num_prompts": int(n),
    }


def saved_train_config(model_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig stored with a checkpoint, or the task of a warm start; None for other models."""
    model_dir = Path(model_dir)
    state = model_dir / "trainer_state.json"
    if state.is_file():
        return TrainConfig.from_dict(json.loads(state.read_text())["train_config"])
    marker = model_dir / "warm_start.json"
    if marker.is_file():
        return TrainConfig(task=TaskConfig(**json.loads(marker.read_text())["spec"]["task"]))
    return None


def evaluate_model(model_dir: str | Path, config: TrainConfig | None = None) -> dict[str, Any]:
    """``drgrpo eval``: evaluate a local model directory (e.g. ``DIR/checkpoints/step_000120``).

    ``config`` supplies the dataset, rewards and generation settings; by default the ones the
    checkpoint was trained with (the built-in held-out split for the default run).
    """
    check_model_dir(str(model_dir))
    config = config or saved_train_config(model_dir) or TrainConfig()
    rewards = Rewards.from_specs(config.rewards, config.reward_weights)
    if config.eval_dataset:
        examples = load_jsonl(config.eval_dataset, config.prompt_field)
    elif config.dataset:
        raise ValueError("evaluating a model trained on --dataset needs --eval-dataset FILE.jsonl (held-out prompts)")
    else:
        examples = make_splits(config.task)[1]
    examples = examples[: config.eval_size]
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    if config.threads or config.model is None:  # as in training: 1 thread for the built-in tiny model
        torch.set_num_threads(config.threads or 1)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, config.dtype, torch.device(config.device)).eval()
    return {"model": str(model_dir), **evaluate(model, tokenizer, examples, rewards, config)}
