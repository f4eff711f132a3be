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

from drgrpo.train.loop.update import TrainState
from drgrpo.train.run.checkpoint import load_optimizer_state, read_state
from drgrpo.train.train_config import TrainConfig


def load_model(path: str | Path, dtype: str, device: torch.device) -> Any:
    """``AutoModelForCausalLM`` from a local directory, with parameters in ``dtype`` ('float32', 'bfloat16', ...)."""
    from transformers import AutoModelForCausalLM  # imported on use: a command that fails first starts faster

    check_local_code(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False)
    model = model.to(device)
    check_finite_weights(model, path)
    return model


def check_finite_weights(model: Any, path: str | Path) -> None:
    """Refuse (ValueError naming the weights file and the tensors) a model loaded from ``path`` with a NaN or an
    infinity in its weights: training or scoring it gives no meaningful number (sampling fails, or every
    completion is the same). drgrpo never saves such weights, so the file was changed or made elsewhere.

    One pass over the floating-point tensors of the state dict and one device sync (the minimum and maximum of
    each tensor, which NaN and infinity reach); the tensors are named only when one is bad.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():  # a tied tensor (lm_head = embed_tokens) once, by its first name
        if t.is_floating_point() and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors[key] = t.detach()
    if not tensors:
        return
    if bool(torch.stack([_min_max(t) for t in tensors.values()]).isfinite().all()):
        return
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    raise ValueError(non_finite_message(weights_file(Path(path), bad[0]), bad))


def check_finite_files(model_dir: str | Path) -> None:
    """Refuse (ValueError, as :func:`check_finite_weights`) a model directory whose safetensors files hold a NaN or
    an infinity, reading them one tensor at a time on the CPU: the check a run makes before it writes anything
    (one pass over the weights; :func:`load_model` checks them again on the device, where that is one sync)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = _json_or_empty(model_dir / "model.safetensors.index.json").get("weight_map")
    names = sorted(set(index.values())) if isinstance(index, dict) else ["model.safetensors"]
    for name in names:
        path = model_dir / str(name)
        if not path.is_file():
            continue  # a model in another format: load_model checks it once loaded
        with safe_open(str(path), framework="pt") as f:
            bad = [k for k in f.keys() if _has_non_finite(f.get_tensor(k))]  # noqa: SIM118  (safe_open: no __iter__)
        if bad:
            raise ValueError(non_finite_message(path, bad))


def _has_non_finite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0 and not bool(_min_max(t).isfinite().all())


def _min_max(t: torch.Tensor) -> torch.Tensor:
    """``(min, max)`` of ``t`` in float32: both finite exactly when every element is (NaN and infinity propagate to
    them). One read of ``t`` and nothing of its size allocated (``isfinite`` would allocate a bool tensor; the
    max-norm is 10 times slower on a CPU)."""
    return torch.stack(torch.aminmax(t)).float()


def non_finite_message(path: Path, bad: list[str]) -> str:
    """The one-line refusal of weights with a NaN or an infinity: the file and the first tensors that hold one."""
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return (
        f"{path} holds non-finite weights (NaN or infinity in {names}): refused, since training or evaluating it "
        "gives no meaningful result. drgrpo never saves such weights: use an earlier checkpoint of the run, or the "
        "model as it was made"
    )


def weights_file(model_dir: Path, tensor: str) -> Path:
    """The safetensors file of ``model_dir`` that holds ``tensor`` (the index's shard for a sharded model)."""
    index = _json_or_empty(model_dir / "model.safetensors.index.json")
    shards = index.get("weight_map") if isinstance(index.get("weight_map"), dict) else None
    if shards:
        return model_dir / str(shards.get(tensor, "model.safetensors.index.json"))
    single = model_dir / "model.safetensors"
    return single if single.is_file() else model_dir


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local model directory, left-padding (prompts end in one column) with a pad token."""
    from transformers import AutoTokenizer

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
    from transformers import AutoConfig

    check_local_code(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def initial_policy_dir(
    model: Path | None, resume_from: Path | None, out_dir: Path, warm_start: Callable[[Path], Any]
) -> Path:
    """The initial policy of a run (the reference of its KL): the resumed run's, ``model``, or a warm start.

    ``model`` is already resolved to a model directory (:func:`drgrpo.train.run.checkpoint.resolve_model_dir`).
    A resumed run whose initial model moved with its run directory (``RUN/warm_start``) is found there.
    ``warm_start(path)`` builds the warm-started tiny model at ``path`` on rank 0 only: under several processes
    the caller makes the others wait for it (the trainer's :func:`~drgrpo.train.run.stopping.agreed`, which also
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
    weights_dir: Path, init_dir: Path, config: TrainConfig, device: torch.device, needs_reference: bool,
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
