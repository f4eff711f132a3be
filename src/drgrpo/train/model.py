"""Loading a policy: a local Hugging Face causal LM and its tokenizer, checked before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def check_model_dir(path: str | Path) -> None:
    """Raise a FileNotFoundError unless ``path`` is a local Hugging Face model directory (with config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"--model {str(path)!r} is not a directory (expected a local Hugging Face model directory)"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {str(path)!r} has no config.json: expected a local Hugging Face model directory "
            "(config.json, weights, tokenizer files), e.g. one written by save_pretrained"
        )


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
