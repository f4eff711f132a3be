"""One optimizer step's batch on a float64 output layer, its micro-batch splits, and the whole-batch oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from drgrpo import LossConfig, group_advantages, policy_loss

HIDDEN, VOCAB = 4, 7


L = 9  # the constant of seq-mean-token-sum-norm; > every completion length below


def make_model(seed: int) -> nn.Linear:
    """A float64 output layer: logits (B, T, V) = x (B, T, H) @ W^T + b."""
    torch.manual_seed(seed)
    return nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)


def token_logp(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """log pi(y_t | x_t) ``(B, T)`` through log_softmax, so the gradient reaches the model's parameters."""
    return torch.log_softmax(model(x), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


@dataclass
class Step:
    """One optimizer step's batch at a spare width W = max_len + 4 (room for extra padding per micro-batch)."""

    x: Tensor  # (B, W, H) features
    y: Tensor  # (B, W) sampled token ids
    old_logp: Tensor  # (B, W) constant, garbage on padding
    ref_logp: Tensor  # (B, W) constant, garbage on padding
    lengths: Tensor  # (B,) real tokens per completion (some 0)
    rewards: Tensor  # (B,) in contiguous groups of group_size
    group_size: int
    model_seed: int

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    def mask(self, rows: slice, width: int) -> Tensor:
        return (torch.arange(width).unsqueeze(0) < self.lengths[rows].unsqueeze(1)).to(torch.float64)


def make_step(seed: int, num_groups: int = 3, group_size: int = 4, max_len: int = 6, ratio_scale: float = 0.3) -> Step:
    g = torch.Generator().manual_seed(seed)
    b, w = num_groups * group_size, max_len + 4
    x = torch.randn(b, w, HIDDEN, generator=g, dtype=torch.float64)
    y = torch.randint(0, VOCAB, (b, w), generator=g)
    lengths = torch.randint(1, max_len + 1, (b,), generator=g)
    lengths[int(torch.randint(0, b, (1,), generator=g))] = 0  # an empty completion: counts as a sequence
    rewards = torch.randn(b, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logp = token_logp(make_model(seed), x, y)
    real = torch.arange(w).unsqueeze(0) < lengths.unsqueeze(1)
    old = logp + ratio_scale * torch.randn(b, w, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(b, w, generator=g, dtype=torch.float64)
    garbage = torch.full_like(logp, 50.0)  # padding must be ignored
    old, ref = torch.where(real, old, garbage), torch.where(real, ref, garbage)
    return Step(x, y, old, ref, lengths, rewards, group_size, seed)


@dataclass
class Micro:
    rows: slice
    width: int


def whole(step: Step) -> Micro:
    return Micro(slice(0, step.num_rows), max(int(step.lengths.max()), 1))


def uneven_split(step: Step, k: int, seed: int) -> list[Micro]:
    """K contiguous micro-batches of unequal sizes (when possible), each with its own width T_k."""
    g = torch.Generator().manual_seed(seed)
    b = step.num_rows
    while True:
        cuts = sorted(torch.randperm(b - 1, generator=g)[: k - 1].add(1).tolist())
        sizes = [e - s for s, e in zip([0, *cuts], [*cuts, b])]
        if len(set(sizes)) > 1 or b % k != 0 or b == k or k == 1:  # uneven whenever that is possible
            break
    micros: list[Micro] = []
    for start, end in zip([0, *cuts], [*cuts, b]):
        width = max(int(step.lengths[start:end].max()), 1)
        while width in {m.width for m in micros}:  # a different T per micro-batch (extra padding)
            width += 1
        micros.append(Micro(slice(start, end), width))
    return micros


def micro_loss(
    model: nn.Module, step: Step, micro: Micro, advantages: Tensor, config: LossConfig, normalizer=None
) -> Tensor:
    r, t = micro.rows, micro.width
    logp = token_logp(model, step.x[r, :t], step.y[r, :t])
    ref = step.ref_logp[r, :t] if config.beta > 0 else None
    out = policy_loss(
        logp, step.old_logp[r, :t], advantages[r], step.mask(r, t), config, ref_logp=ref, normalizer=normalizer
    )
    return out.loss


def gradients(model: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def whole_batch(step: Step, config: LossConfig) -> tuple[Tensor, list[Tensor]]:
    """The oracle: the whole batch's loss and gradient, its own counts, no normalizer."""
    model = make_model(step.model_seed)
    adv = group_advantages(step.rewards, step.group_size, config)
    loss = micro_loss(model, step, whole(step), adv, config)
    loss.backward()
    return loss.detach(), gradients(model)


def aggregation_config(aggregation: str) -> LossConfig:
    return LossConfig(
        aggregation=aggregation, max_completion_length=L, advantage_std="group", std_eps=1e-6, beta=0.04, kl="k3"
    )


def preset_config(name: str) -> LossConfig:
    return LossConfig.preset(name, max_completion_length=L) if name == "dr_grpo" else LossConfig.preset(name)
