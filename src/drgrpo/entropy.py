r"""The high-entropy token mask and the entropy bonus, from per-token entropies ``H (B, T)``.

Mask (Wang et al. 2025, "Beyond the 80/20 rule", arXiv 2506.01939; TRL's ``top_entropy_quantile = q``):
keep a token's surrogate iff ``H_t >= tau``, ``tau`` the ``1 - q`` quantile (linear interpolation, float32 as
TRL) of the entropies of the real tokens it is computed over. TRL computes ``tau`` per micro-batch (gathered
over processes), so its mask changes with the split; for the same gradient for any split, compute ``tau`` once
per step over the whole step's entropies (:func:`entropy_threshold`) and pass it to every call.

Bonus (TRL's ``entropy_coef = c``): ``loss <- loss - c * sum_t H_t m'_t / N'`` with ``m'`` the real tokens the
mask keeps; per call ``N' = sum m'`` (TRL, which then divides by the accumulation steps), with a step
normaliser ``N'`` is the step's real-token count over the world size, so the micro-batches' bonuses add up to the step's
``c * sum H m' / N_tok``. :class:`AdaptiveEntropyCoef` is TRL's controller of ``c`` (Skywork-OR1, arXiv 2505.22312).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from drgrpo.normalizer import StepNormalizer


def entropy_threshold(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """``tau``: the ``1 - quantile`` quantile of ``entropy`` over real tokens (a float32 scalar, as TRL), or
    +inf when there is no real token (the mask keeps nothing). For a whole step, concatenate the step's real
    entropies (all processes) and pass them with a mask of ones."""
    values = entropy.detach()[mask.bool()].float()
    if values.numel() == 0:
        return torch.tensor(float("inf"), device=entropy.device)
    return torch.quantile(values, 1.0 - quantile)


def high_entropy_mask(entropy: Tensor, mask: Tensor, threshold: Tensor | float) -> Tensor:
    """``(B, T)`` bool: real tokens with ``H_t >= threshold``."""
    return (entropy.detach() >= threshold) & mask.bool()


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float, normalizer: StepNormalizer | None = None) -> Tensor:
    """``c * sum_t H_t m_t / N`` (a scalar to subtract from the loss; differentiable in ``entropy``): ``N`` is
    ``sum m`` (per call), or with ``normalizer`` the step's real-token count over its world size."""
    m = mask.to(entropy.dtype)
    total = (entropy * m).sum()
    if normalizer is None:
        return coef * total / m.sum().clamp_min(1)
    return coef * total * normalizer.world_size / max(normalizer.num_tokens, 1.0)


class AdaptiveEntropyCoef:
    """TRL's adaptive entropy coefficient (``use_adaptive_entropy``): the bonus applies ``coef`` while the last
    step's entropy is at most ``target`` (0 otherwise; none measured yet: 0); after each optimizer step ``coef``
    moves by ``delta`` towards more bonus if that step's entropy was at most ``target``, less otherwise, within
    ``[coef_min, coef_max]``. ``DrGRPOTrainer`` keeps TRL's state in it (``entropy_coef`` is :attr:`coef`,
    ``_last_world_entropy`` is :attr:`last_entropy`)."""

    def __init__(self, coef: float, coef_min: float, coef_max: float, delta: float, target: float) -> None:
        self.coef, self.coef_min, self.coef_max, self.delta, self.target = coef, coef_min, coef_max, delta, target
        self.last_entropy = float("inf")  # no measurement yet: no bonus in the first step
        self._window: Tensor | None = None  # (2,) float32: sum H m, sum m of the current step so far

    def applied(self) -> float:
        """The coefficient every micro-batch of the current step uses."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def observe(self, entropy: Tensor, mask: Tensor) -> None:
        """Add a micro-batch's ``sum H m`` and ``sum m`` (``entropy``, ``mask`` ``(B, T)``) to the current step's
        window (float32 tensors on ``entropy``'s device: no sync)."""
        m = mask.to(entropy.dtype)
        stats = torch.stack([(entropy.detach() * m).sum(), m.sum()]).float()
        self._window = stats if self._window is None else self._window + stats

    def window(self) -> Tensor:
        """The current window's ``[sum H m, sum m]`` ``(2,)`` float32, e.g. to all-reduce before :meth:`step`."""
        return torch.zeros(2) if self._window is None else self._window

    def step(self, entropy_sum: float | None = None, count: float | None = None) -> float:
        """End of an optimizer step: the window's mean entropy (pass the all-reduced ``sum`` and ``count`` to
        use every process's), the coefficient update, and the window reset. Returns the new ``coef``."""
        total, n = (float(x) for x in self.window()) if entropy_sum is None or count is None else (entropy_sum, count)
        world = total / max(n, 1.0)
        if world <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = world
        self._window = None
        return self.coef
