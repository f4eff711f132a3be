"""Input checks shared by the loss functions: errors that name the argument, what it got and what was expected.

The value checks (finite, 0/1 mask) read the data and therefore synchronise a GPU; they run once
per call, outside the arithmetic, and can be switched off with ``validate=False`` where a caller
has already checked its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_tensor(name: str, value: object) -> Tensor:
    """``value`` as a tensor, or a TypeError naming ``name``."""
    if isinstance(value, Tensor):
        return value
    raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_floating(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_shape(name: str, x: Tensor, expected: tuple[int, ...], expected_text: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {expected_text} = {expected}, got {tuple(x.shape)}")


def check_finite(name: str, x: Tensor) -> None:
    """Raise if ``x`` holds NaN or inf, naming the first bad position."""
    _raise_at_first_bad(name, x, ~torch.isfinite(x))


def check_finite_where(name: str, x: Tensor, mask: Tensor) -> None:
    """Like :func:`check_finite`, but only where ``mask`` is 1 (padding may hold anything)."""
    _raise_at_first_bad(name, x, ~torch.isfinite(x) & mask.bool())


def check_finite_large(name: str, x: Tensor) -> None:
    """Like :func:`check_finite` for a large tensor (an output layer ``(V, H)``): one pass for its min and max,
    which NaN and infinity reach, and no tensor of ``x``'s size unless it holds a bad value."""
    if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        check_finite(name, x)


def check_finite_rows(name: str, x: Tensor, mask: Tensor) -> None:
    """Raise if a row ``x[i, t, :]`` where ``mask[i, t]`` is 1 holds NaN or inf, naming the first bad position.

    One pass over ``x`` for each row's min and max, which NaN and infinity reach; only ``mask``-sized tensors
    are allocated (no copy of the rows), so padding rows may hold anything and cost nothing extra.
    """
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x, dim=-1)
    if bool((~(torch.isfinite(lo) & torch.isfinite(hi)) & mask.bool()).any()):
        check_finite_where(name, x, mask.bool().unsqueeze(-1))  # only now: the message, at the first bad position


def check_same_device(name: str, x: Tensor, **others: object) -> None:
    """Every tensor among ``others`` is on ``x``'s device; else a ValueError naming which argument is on which."""
    for other, y in others.items():
        if isinstance(y, Tensor) and y.device != x.device:
            raise ValueError(f"{other} is on {y.device} but {name} is on {x.device}; move them to one device")


def _raise_at_first_bad(name: str, x: Tensor, bad: Tensor) -> None:
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise ValueError(f"{name} has a non-finite value {x[first].item()} at position {first}")


def check_mask(name: str, mask: Tensor) -> None:
    """A mask must hold only 0 and 1 (bool, integer or floating)."""
    if mask.dtype == torch.bool:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise ValueError(f"{name} must contain only 0 and 1, got {mask[first].item()} at position {first}")
