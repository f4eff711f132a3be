"""Loading a policy: a local Hugging Face causal LM, its tokenizer, and a run's initial training state.

Nothing here runs code from a model directory: every ``from_pretrained`` gets ``trust_remote_code=False``, and a
directory whose classes exist only in its own Python files (``auto_map`` in config.json or tokenizer_config.json
for a type transformers does not have built in) is refused before anything is loaded (:func:`check_local_code`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from drgrpo.train.checkpoint import load_optimizer_state, read_state
from drgrpo.train.update import TrainState


def load_model(path: str | Path, dtype: str, device: torch.device) -> Any:
    """``AutoModelForCausalLM`` from a local directory, with parameters in ``dtype`` ('float32', 'bfloat16', ...)."""
    check_local_code(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False)
    return model.to(device)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local model directory, left-padding (prompts end in one column) with a pad token."""
    check_local_code(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = "left"  # generation appends on the right: prompts end in the same column
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_local_code(path: str | Path) -> None:
    """Refuse (ValueError) a model directory that needs its own Python code to load.

    Its ``config.json`` or ``tokenizer_config.json`` then has an ``auto_map`` (classes in the directory's .py
    files) for a model type or tokenizer class that transformers does not have built in. drgrpo never runs such
    code (no trust_remote_code), so transformers never asks its [y/N] question. With a built-in type the
    ``auto_map`` is ignored and transformers' own classes load the weights, as ``trust_remote_code=False`` does.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    path = Path(path)
    config, tok = _json_or_empty(path / "config.json"), _json_or_empty(path / "tokenizer_config.json")
    model_type = config.get("model_type")
    built_in = model_type in CONFIG_MAPPING
    if "auto_map" in config and not built_in:
        raise ValueError(
            f"{path}: needs remote code: config.json has auto_map (its model classes are Python files in the "
            f"directory) for model_type {model_type!r}, which transformers does not have built in; drgrpo never "
            "runs code from a model directory (no trust_remote_code): use a model transformers supports natively"
        )
    name = str(tok.get("tokenizer_class") or "")
    if (
        "auto_map" in tok
        and not built_in
        and not (name and (tokenizer_class_from_name(name) or tokenizer_class_from_name(name + "Fast")))
    ):
        raise ValueError(
            f"{path}: needs remote code: tokenizer_config.json has auto_map (its tokenizer class {name or '(unnamed)'} "
            "is a Python file in the directory); drgrpo never runs code from a model directory (no "
            "trust_remote_code): use a tokenizer transformers supports natively"
        )


def _json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or not an object (transformers reports a broken one itself)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def context_length(path: str | Path) -> int | None:
    """The longest sequence (prompt + completion, in tokens) the model in ``path`` takes: ``max_position_embeddings``
    of its config (``n_positions`` for GPT-2 style configs), or None when the config does not say."""
    check_local_code(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def initial_policy_dir(
    model: Path | None, resume_from: Path | None, out_dir: Path, warm_start: Callable[[Path], Any]
) -> Path:
    """The initial policy of a run (the reference of its KL): the resumed run's, ``model``, or a warm start.

    ``model`` is already resolved to a model directory (:func:`drgrpo.train.checkpoint.resolve_model_dir`).
    A resumed run whose initial model moved with its run directory (``RUN/warm_start``) is found there.
    ``warm_start(path)`` builds the warm-started tiny model at ``path`` (rank 0 only, then a barrier).
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
    if dist.is_initialized():
        dist.barrier()
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
