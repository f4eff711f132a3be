"""Supervised warm start of the built-in model, cached as a Hugging Face model directory.

RL needs a policy that sometimes succeeds: with 0% success every group has equal rewards
and every advantage is 0. A short supervised run on the train split (prompt -> answer +
working tokens, loss on the completion only) brings the tiny model to a modest success
rate; Dr. GRPO takes it from there.

Small transformers learn addition abruptly (accuracy jumps from ~10% to ~90% within a few
dozen steps), so a fixed step count would land anywhere on that cliff. Instead the warm
start stops as soon as greedy accuracy on a probe reaches ``target_accuracy`` (checked every
``check_every`` steps), at most ``steps`` steps. The probe is the first ``probe_size`` examples
of the *train* split, left out of the supervised data, so it measures generalisation like the
held-out split does without ever touching it.

The result is saved with ``save_pretrained`` next to a ``warm_start.json`` describing how
it was made; a later call with the same settings reuses it, so several runs (e.g. one per
loss and seed) can start from the very same weights via ``TrainConfig(model=path)``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from drgrpo.train.loop.rollout import generate
from drgrpo.train.loop.task import TaskConfig, exact_match, make_splits, sft_pairs
from drgrpo.train.loop.tiny import build_model, build_tokenizer
from drgrpo.train.train_config import WarmStartConfig

MARKER = "warm_start.json"


def _batch(pairs: list[tuple[str, str]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right-padded; labels are -100 on the prompt and padding."""
    rows, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(r)] = torch.tensor(lb)
        attn[i, : len(r)] = 1
    return ids, attn, lab


def warm_start(
    out_dir: str | Path, config: WarmStartConfig, task: TaskConfig, *, log: Any = None, force: bool = False
) -> Path:
    """Build the tiny model, train it supervised for ``config.steps`` and save it to ``out_dir``.

    Args:
        out_dir: where the model directory goes (reused if it holds a warm start made with the same settings).
        config: the warm start's settings (steps, batch size, learning rate, the tiny model's shape).
        task: the built-in task (its train split is the supervised data; the held-out split is never touched).
        log: optional callable receiving a line when the warm start begins and one when it is done (or reused).
        force: retrain even if a matching cached warm start exists.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    spec = {"warm_start": dataclasses.asdict(config), "task": dataclasses.asdict(task)}
    marker = out_dir / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        if log:
            log(f"warm start: reusing {out_dir}")
        return out_dir

    if log:
        until = f", until train-probe accuracy {config.target_accuracy:.2f}" if config.target_accuracy > 0 else ""
        log(f"warm start: training the built-in model, supervised, up to {config.steps} steps{until} ...")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(config.model, tokenizer, seed=config.seed)
    train, _ = make_splits(task)
    # the probe measures generalisation: its examples are kept out of the supervised data (RL still sees them)
    n_probe = min(config.probe_size, len(train) // 4)  # small tasks: at most a quarter of the train split
    probe, supervised = train[:n_probe], train[n_probe:]
    pairs = sft_pairs(supervised, task, random.Random(config.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, accuracy, loss_value = 0, 0.0, float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for step in range(1, config.steps + 1):
            model.train()
            ids, attn, labels = _batch([next(pairs) for _ in range(config.batch_size)], tokenizer)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            if config.target_accuracy > 0 and step % config.check_every == 0:
                accuracy = probe_accuracy(model, tokenizer, probe, task)
                if accuracy >= config.target_accuracy:
                    break
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # written last: a write cut short is never taken for a finished warm start
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    seconds = time.perf_counter() - t0
    summary = {"steps": step, "probe_accuracy": accuracy, "final_loss": loss_value, "seconds": seconds}
    marker.write_text(json.dumps({"spec": spec, **summary}, indent=2))
    if log:
        log(f"warm start: {step} supervised steps in {seconds:.1f}s, train-probe accuracy {accuracy:.2f} -> {out_dir}")
    return out_dir


@torch.no_grad()
def probe_accuracy(model: Any, tokenizer: Any, examples: list[dict[str, Any]], task: TaskConfig) -> float:
    """Greedy exact-match accuracy on ``examples``."""
    budget = task.max_answer_tokens + task.max_work + 1
    batch = generate(model, tokenizer, [e["prompt"] for e in examples], 1, max_new_tokens=budget, temperature=0.0)
    return sum(exact_match(c, e) for c, e in zip(batch.texts, examples, strict=True)) / max(len(examples), 1)
