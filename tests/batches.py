"""Random ragged batches for tests: log-probs, old/ref log-probs, rewards in groups, masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    logp: Tensor  # (B, T)
    old_logp: Tensor  # (B, T)
    ref_logp: Tensor  # (B, T)
    rewards: Tensor  # (B,)
    mask: Tensor  # (B, T) float 0/1, ragged (right padding), may have empty rows
    group_size: int


def random_batch(
    num_groups: int = 3,
    group_size: int = 4,
    max_len: int = 7,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    empty_rows: int = 0,
    ratio_scale: float = 0.3,
    binary_rewards: bool = False,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b = num_groups * group_size
    logp = -torch.rand(b, max_len, generator=g, dtype=torch.float64) * 3 - 0.01
    old_logp = logp + ratio_scale * torch.randn(b, max_len, generator=g, dtype=torch.float64)
    ref_logp = logp + ratio_scale * torch.randn(b, max_len, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, max_len + 1, (b,), generator=g)
    if empty_rows:
        lengths[torch.randperm(b, generator=g)[:empty_rows]] = 0
    mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    if binary_rewards:
        rewards = torch.randint(0, 2, (b,), generator=g).to(torch.float64)
    else:
        rewards = torch.randn(b, generator=g, dtype=torch.float64)
    # Padding holds garbage on purpose: the loss must ignore it.
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, 123.0))
    return Batch(logp.to(dtype), old_logp.to(dtype), ref_logp.to(dtype), rewards.to(dtype), mask.to(dtype), group_size)
