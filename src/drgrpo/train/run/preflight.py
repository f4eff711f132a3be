"""Checks before any work that need nothing of the RL loop: the device, the tensorboard package, the output
directory, the loss options this trainer cannot feed.

Each raises a ValueError (a :class:`~drgrpo.field_error.FieldError` for a loss field) that names the flag, what it
found and what was expected; ``drgrpo train`` prints it on one line and exits with code 2, before the warm start.
The whole set-up's checks, the loop's inputs included, run in :func:`drgrpo.train.loop.setup.check_run`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from drgrpo.config import LossConfig
from drgrpo.field_error import FieldError


def check_loss_inputs(loss_config: LossConfig) -> None:
    """Refuse the loss options that need inputs this trainer does not make, naming the field (the CLI: the flag).

    ``sampling_correction`` weighs each token by pi_old / pi_sampler, for runs whose completions come from another
    engine (vLLM): here the policy samples its own completions, so there is no sampler's log-prob to read.
    ``top_entropy_quantile < 1`` and ``entropy_coef`` need per-token entropies with one threshold per step, which this
    trainer does not compute. All three are in :func:`drgrpo.policy_loss` and ``DrGRPOTrainer``.
    """
    where = "drgrpo.policy_loss and DrGRPOTrainer have it"
    if loss_config.sampling_correction is not None:
        raise FieldError(
            LossConfig,
            "sampling_correction",
            f"sampling_correction {loss_config.sampling_correction!r} needs a separate sampler's log-probs (vLLM's), "
            f"but drgrpo train samples with the policy itself: leave it unset ({where})",
        )
    if loss_config.top_entropy_quantile < 1:
        raise FieldError(
            LossConfig,
            "top_entropy_quantile",
            f"top_entropy_quantile {loss_config.top_entropy_quantile} needs per-token entropies, which drgrpo train "
            f"does not compute: leave it at 1 ({where})",
        )
    if loss_config.entropy_coef != 0:
        raise FieldError(
            LossConfig,
            "entropy_coef",
            f"entropy_coef {loss_config.entropy_coef} needs per-token entropies, which drgrpo train does not "
            f"compute: leave it at 0 ({where})",
        )


def check_output_dir(path: str | Path) -> None:
    """Create the output directory if needed and make sure this process can write into it.

    Raises ValueError when ``path`` (or a parent) is a file, or when the directory cannot be created or
    written (permissions, a read-only file system).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {str(path)!r} is a file; expected a directory (created if missing)")
    probe = path / f".drgrpo_write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(
            f"--output-dir {str(path)!r} cannot be written ({reason}); expected a directory this user can write"
        ) from None


def check_device(device: str) -> None:
    """``device`` names a torch device that exists here (``cuda`` needs a CUDA build and a visible GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device; expected cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"--device {device}: the {dev.type} backend is not available here; use --device cpu")


def check_tensorboard(enabled: bool) -> None:
    """With ``--tensorboard``, the tensorboard package must be importable."""
    if not enabled:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError(
            "--tensorboard needs the tensorboard package (pip install tensorboard); without it, leave out "
            "--tensorboard: metrics.jsonl holds every value"
        ) from None
