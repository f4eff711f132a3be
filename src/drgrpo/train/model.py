"""Loading a policy: a local Hugging Face causal LM, its tokenizer, and a run's initial training state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from drgrpo.train.checkpoint import load_optimizer_state, read_state
from drgrpo.train.update import TrainState


def load_model(path: str | Path, dtype: str, device: torch.device) -> Any:
    """``AutoModelForCausalLM`` from a local directory, with parameters in ``dtype`` ('float32', 'bfloat16', ...)."""
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local model directory, left-padding (prompts end in one column) with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation appends on the right: prompts end in the same column
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def initial_policy_dir(
    model: Path | None, resume_from: Path | None, out_dir: Path, warm_start: Callable[[Path], Any]
) -> Path:
    """The initial policy of a run (the reference of its KL): the resumed run's, ``model``, or a warm start.

    ``model`` is already resolved to a model directory (:func:`drgrpo.train.checkpoint.resolve_model_dir`).
    A resumed run whose initial model moved with its run directory (``RUN/warm_start``) is found there.
    ``warm_start(path)`` builds the warm-started tiny model at ``path`` on rank 0 only: under several processes
    the caller makes the others wait for it (the trainer's :func:`~drgrpo.train.stopping.agreed`, which also
    stops them all when a signal abandons the warm start).
    """
    if resume_from is not None:
        init = Path(read_state(resume_from)["init_model"])
        moved = resume_from.parent.parent / "warm_start"
        return moved if not init.is_dir() and moved.is_dir() else init
    if model is not None:
        return model
    path = out_dir / "warm_start"
    if not dist.is_initialized() or dist.get_rank() == 0:
        warm_start(path)
    return path


def load_train_state(
    weights_dir: Path, init_dir: Path, config: Any, device: torch.device, needs_reference: bool,
    resume_from: Path | None,
) -> TrainState:  # fmt: skip
    """The policy (from ``weights_dir``: a checkpoint or the initial model), its tokenizer, the optimizer
    (``config.optimizer``, its state from ``resume_from``), the frozen reference (from ``init_dir``, only if
    ``needs_reference``) and the DDP wrapper under several processes. ``state.step`` is the resumed step (or 0).
    """
    tokenizer = load_tokenizer(weights_dir)
    model = load_model(weights_dir, config.dtype, device).train()
    optimizer = config.optimizer(model.parameters())
    step = 0
    if resume_from is not None:
        optimizer.load_state_dict(load_optimizer_state(resume_from, device))
        step = int(read_state(resume_from)["step"])
    ref = load_model(init_dir, config.dtype, device).eval().requires_grad_(False) if needs_reference else None
    policy = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    return TrainState(model=model, policy=policy, optimizer=optimizer, tokenizer=tokenizer, ref_model=ref, step=step)
