r"""GRPO's length bias, isolated: a two-decision policy trained with :func:`drgrpo.policy_loss`.

The controlled policy answers one prompt (right with probability ``sigmoid(theta)``), then stops or adds a working
token at each position (stop logits that see correctness, or one blind logit). :func:`expected_gradient`
evaluates the expected gradient on the stop logits in float64; :func:`train_policy` trains the policy on sampled
groups with the real :func:`drgrpo.group_advantages` and :func:`drgrpo.policy_loss`. The derivation:
docs/design.md, section 9.6; the results: docs/length-bias.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from drgrpo.advantages import group_advantages
from drgrpo.config import LossConfig
from drgrpo.loss import policy_loss
from drgrpo.presets import GROUP_STD

ARMS: tuple[str, ...] = ("grpo", "dr_grpo", "grpo_no_std", "dr_grpo_std")
"""The four losses compared: GRPO, Dr. GRPO, and each Dr. GRPO change alone (``beta = 0`` everywhere).

``grpo``: group std and ``1/|o_i|``; ``dr_grpo``: neither; ``grpo_no_std``: ``1/|o_i|`` without the std
(Dr. GRPO's std change alone); ``dr_grpo_std``: constant ``1/L`` with the std (the aggregation change alone).
"""

ARM_LABELS: dict[str, str] = {
    "grpo": "GRPO (std, 1/|o|)",
    "dr_grpo": "Dr. GRPO (no std, 1/L)",
    "grpo_no_std": "no std, 1/|o|",
    "dr_grpo_std": "std, 1/L",
}


def arm_config(arm: str, max_length: int) -> LossConfig:
    """The :class:`LossConfig` of one arm, with ``beta = 0`` and Dr. GRPO's ``L = max_length``."""
    if arm == "grpo":
        return LossConfig.preset("grpo", beta=0.0)
    if arm == "dr_grpo":
        return LossConfig.preset("dr_grpo", max_completion_length=max_length)
    if arm == "grpo_no_std":
        return LossConfig.preset("grpo", beta=0.0, advantage_std="none", std_eps=0.0)
    if arm == "dr_grpo_std":
        return LossConfig.preset("dr_grpo", max_completion_length=max_length, **GROUP_STD)
    raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {arm!r}")


# --------------------------------------------------------------------------- closed forms (float64)


def _check_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (the answer and one more token), got {max_length!r}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")


def length_distribution(p_stop: float, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lengths one stop probability produces, as float64 arrays ``(L,)``: (probability, length, score).

    Entry ``n = 0 .. L-2``: ``n`` working tokens then EOS, probability ``(1-p)^n p``, length ``n + 2``, score
    ``1 - (n+1) p``. Entry ``L-1``: cut off, probability ``(1-p)^(L-1)``, length ``L``, score ``-(L-1) p``.
    The score is ``d log P(n) / d phi`` for ``p = sigmoid(phi)``.
    """
    _check_probability("p_stop", p_stop)
    _check_length(max_length)
    n = np.arange(max_length, dtype=np.float64)
    prob = (1.0 - p_stop) ** n * p_stop
    length = n + 2.0
    score = 1.0 - (n + 1.0) * p_stop
    prob[-1] = (1.0 - p_stop) ** (max_length - 1)
    length[-1] = float(max_length)
    score[-1] = -(max_length - 1) * p_stop
    return prob, length, score


def sequence_weight(length: np.ndarray, config: LossConfig) -> np.ndarray:
    """Per-token weight of a completion of each length, times the number of completions: ``1/|o|`` or ``1/L``."""
    agg = config.effective_aggregation
    if agg == "seq-mean-token-mean":
        return 1.0 / length
    if agg == "seq-mean-token-sum-norm":
        assert config.max_completion_length is not None  # LossConfig.preset enforces it
        return np.full_like(length, 1.0 / config.max_completion_length)
    raise ValueError(
        f"config.aggregation must be 'seq-mean-token-mean' (GRPO) or 'seq-mean-token-sum-norm' (Dr. GRPO) "
        f"for the closed form, got {agg!r}"
    )


def stop_pull(p_stop: float, max_length: int, config: LossConfig) -> float:
    """``H = E[w(|o|) g]``: the expected weighted stop score of a completion (``> 0`` for GRPO, ``0`` for Dr. GRPO)."""
    prob, length, score = length_distribution(p_stop, max_length)
    return float(np.sum(prob * sequence_weight(length, config) * score))


def mean_length(p_stop: float, max_length: int) -> float:
    """``E[|o|]`` for one stop probability, in tokens (answer and EOS included)."""
    prob, length, _ = length_distribution(p_stop, max_length)
    return float(np.sum(prob * length))


def advantage_mass(accuracy: float, group_size: int, config: LossConfig) -> tuple[float, float]:
    """``(M_right, M_wrong)``, ``M_c = E[A_1 1{c_1 = c}]``, for 0/1 rewards and right-probability ``accuracy``.

    With ``k`` right answers in a group of ``G``, a right one gets ``(1 - k/G) / s_k`` and a wrong one
    ``-(k/G) / s_k``, where ``s_k = 1`` without the std and ``s_k = std_k + eps`` with the group std,
    ``std_k^2 = k (G-k) / (G (G - ddof))`` (0 when ``k`` is 0 or G: then every advantage is 0). The other
    ``G - 1`` answers are Binomial(G-1, q). Without the std, ``M_right = -M_wrong = q (1-q) (G-1) / G``.
    """
    _check_probability("accuracy", accuracy)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if config.advantage_std == "batch":
        raise ValueError("advantage_std='batch' couples groups; the closed form covers 'group' and 'none'")
    q, g = accuracy, group_size
    ddof = 1 if config.std_unbiased else 0

    def adv(right: bool, k: int) -> float:
        centered = (1.0 if right else 0.0) - k / g
        if config.advantage_std == "none":
            return centered
        std = math.sqrt(k * (g - k) / (g * (g - ddof)))
        if config.std_zero_threshold is not None and std < config.std_zero_threshold:
            return 0.0
        return centered / (std + config.std_eps) if std + config.std_eps > 0 else 0.0

    m_right = m_wrong = 0.0
    for s in range(g):  # s: right answers among the other G - 1
        prob = math.comb(g - 1, s) * q**s * (1 - q) ** (g - 1 - s)
        m_right += q * prob * adv(True, s + 1)
        m_wrong += (1 - q) * prob * adv(False, s)
    return m_right, m_wrong


@dataclass(frozen=True)
class ExpectedGradient:
    """Expected gradient of the batch loss (per completion, whatever the batch size) on each parameter."""

    theta: float
    """``E[d loss / d theta]`` (the answer logit)."""
    phi: np.ndarray
    """``E[d loss / d phi]``: ``(2,)`` [right, wrong] when the stop sees correctness, ``(1,)`` when blind."""


def expected_gradient(
    theta: float, phi: np.ndarray | list[float], max_length: int, group_size: int, config: LossConfig
) -> ExpectedGradient:
    """The expected gradient of :func:`~drgrpo.loss.policy_loss` for the controlled policy, in float64.

    ``E[d loss / d phi_c] = -M_c H_c`` (``H_c`` = :func:`stop_pull` at ``p_c``); blind, the two terms share
    ``phi``: ``-(M_right H + M_wrong H)``. ``E[d loss / d theta] = -(M_right (1-q) E[w|right] - M_wrong q E[w|wrong])``
    (the answer's score is ``1 - q`` if right, ``-q`` if wrong).
    """
    phi = np.asarray(phi, dtype=np.float64)
    if phi.shape not in ((1,), (2,)):
        raise ValueError(f"phi must have shape (2,) [right, wrong] or (1,) [blind], got {phi.shape}")
    q = 1.0 / (1.0 + math.exp(-theta))
    m = advantage_mass(q, group_size, config)
    p = 1.0 / (1.0 + np.exp(-phi))
    p_c = (p[0], p[-1])  # stop probability after a right / a wrong answer
    pull = [stop_pull(float(pc), max_length, config) for pc in p_c]
    mean_w = []
    for pc in p_c:
        prob, length, _ = length_distribution(float(pc), max_length)
        mean_w.append(float(np.sum(prob * sequence_weight(length, config))))
    d_theta = -(m[0] * (1 - q) * mean_w[0] - m[1] * q * mean_w[1])
    d_phi = np.array([-m[0] * pull[0], -m[1] * pull[1]])
    if phi.shape == (1,):
        d_phi = np.array([d_phi.sum()])
    return ExpectedGradient(theta=float(d_theta), phi=d_phi)


# --------------------------------------------------------------------------- the policy (torch)


class StopPolicy(torch.nn.Module):
    """The controlled policy: answer logit ``theta`` (scalar) and stop logits ``phi`` (``(2,)`` or ``(1,)``)."""

    def __init__(self, accuracy: float, p_stop: float, sees_correctness: bool, dtype: torch.dtype = torch.float64):
        super().__init__()
        _check_probability("accuracy", accuracy)
        _check_probability("p_stop", p_stop)
        self.theta = torch.nn.Parameter(torch.tensor(math.log(accuracy / (1 - accuracy)), dtype=dtype))
        stop = math.log(p_stop / (1 - p_stop))
        self.phi = torch.nn.Parameter(torch.full((2 if sees_correctness else 1,), stop, dtype=dtype))

    @property
    def sees_correctness(self) -> bool:
        return self.phi.shape[0] == 2

    def stop_logit(self, correct: Tensor) -> Tensor:
        """``(B,)`` stop logit of each completion: ``phi[right]``/``phi[wrong]``, or the shared one."""
        if self.sees_correctness:
            return torch.where(correct, self.phi[0], self.phi[1])
        return self.phi[0].expand(correct.shape[0])

    @torch.no_grad()
    def sample(self, num_completions: int, max_length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Sample completions: ``correct`` ``(B,)`` bool and ``num_work`` ``(B,)`` int64 (``L-1`` = cut off)."""
        _check_length(max_length)
        u = torch.rand(num_completions, generator=generator, dtype=self.theta.dtype)
        correct = u < torch.sigmoid(self.theta)
        p = torch.sigmoid(self.stop_logit(correct))  # (B,)
        stops = torch.rand(num_completions, max_length - 1, generator=generator, dtype=p.dtype) < p[:, None]
        first = torch.where(stops.any(1), stops.to(torch.int64).argmax(1), max_length - 1)  # (B,)
        return correct, first

    def log_probs(self, correct: Tensor, num_work: Tensor, max_length: int) -> tuple[Tensor, Tensor]:
        """Per-token log-probabilities ``(B, L)`` (differentiable) and the 0/1 mask ``(B, L)``.

        Position 0 holds the answer, positions ``1 .. n`` the working tokens, position ``n + 1`` the EOS
        (absent when cut off, ``n = L - 1``).
        """
        pos = torch.arange(max_length)[None, :]  # (1, L)
        n = num_work[:, None]  # (B, 1)
        answer = torch.where(correct, F.logsigmoid(self.theta), F.logsigmoid(-self.theta))[:, None]  # (B, 1)
        logit = self.stop_logit(correct)[:, None]  # (B, 1)
        logp = torch.where(
            pos == 0,
            answer,
            torch.where(pos <= n, F.logsigmoid(-logit), torch.where(pos == n + 1, F.logsigmoid(logit), 0.0)),
        )  # (B, L)
        mask = pos <= n + 1  # (B, L): answer, working tokens, EOS; a cut-off row fills all L positions
        return logp.masked_fill(~mask, 0.0), mask


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class MechanismConfig:
    """One training run of the controlled policy."""

    arm: str = "grpo"
    """Loss: one of :data:`ARMS` (beta = 0 in all)."""
    sees_correctness: bool = True
    """The stop decision has one logit for right and one for wrong answers (False: one shared logit)."""
    steps: int = 300
    """SGD steps, one batch of sampled groups each."""
    groups: int = 64
    """Groups (prompts) per step."""
    group_size: int = 8
    """Completions per group (G)."""
    max_length: int = 16
    """Token budget L (answer, working tokens, EOS); also Dr. GRPO's constant L."""
    lr: float = 1.0
    """Learning rate of plain SGD (the expected step is -lr times the expected gradient)."""
    accuracy: float = 0.5
    """Initial probability of a right answer."""
    p_stop: float = 0.25
    """Initial stop probability at each position after the answer (mean length 4.95 tokens at L = 16)."""
    seed: int = 0
    """Seed of the sampling generator."""

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"MechanismConfig.arm must be one of {', '.join(ARMS)}, got {self.arm!r}")
        for name in ("steps", "groups", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MechanismConfig.{name} must be a positive int, got {value!r}")
        if self.group_size < 2:
            raise ValueError(
                f"MechanismConfig.group_size must be >= 2 (advantages compare answers), got {self.group_size}"
            )
        _check_length(self.max_length)
        if not self.lr > 0:
            raise ValueError(f"MechanismConfig.lr must be > 0, got {self.lr!r}")
        _check_probability("MechanismConfig.accuracy", self.accuracy)
        _check_probability("MechanismConfig.p_stop", self.p_stop)


@dataclass
class MechanismHistory:
    """Per-step curves of one run (index 0 = before the first step)."""

    accuracy: list[float] = field(default_factory=list)
    """Share of right answers in the step's batch."""
    length_correct: list[float] = field(default_factory=list)
    """Mean length of the batch's right completions (NaN if none)."""
    length_incorrect: list[float] = field(default_factory=list)
    """Mean length of the batch's wrong completions (NaN if none)."""
    theta: list[float] = field(default_factory=list)
    """Answer logit before the step."""
    phi: list[list[float]] = field(default_factory=list)
    """Stop logit(s) before the step."""


def batch_gradient(
    policy: StopPolicy, correct: Tensor, num_work: Tensor, group_size: int, max_length: int, config: LossConfig
) -> Tensor:
    """The loss of one batch of groups through :func:`group_advantages` and :func:`policy_loss`; backward runs."""
    logp, mask = policy.log_probs(correct, num_work, max_length)
    rewards = correct.to(logp.dtype)
    advantages = group_advantages(rewards, group_size, config)
    loss = policy_loss(logp, None, advantages, mask, config).loss
    loss.backward()
    return loss.detach()


def train_policy(config: MechanismConfig) -> MechanismHistory:
    """Train the controlled policy on sampled groups with the arm's loss and plain SGD; deterministic per seed."""
    loss_config = arm_config(config.arm, config.max_length)
    policy = StopPolicy(config.accuracy, config.p_stop, config.sees_correctness)
    optimizer = torch.optim.SGD(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history = MechanismHistory()
    batch = config.groups * config.group_size
    for step in range(config.steps + 1):  # the last batch only measures the final policy
        correct, num_work = policy.sample(batch, config.max_length, generator)
        length = torch.where(num_work < config.max_length - 1, num_work + 2, config.max_length).to(torch.float64)
        history.accuracy.append(correct.double().mean().item())
        history.length_correct.append(length[correct].mean().item() if correct.any() else math.nan)
        history.length_incorrect.append(length[~correct].mean().item() if (~correct).any() else math.nan)
        history.theta.append(policy.theta.item())
        history.phi.append(policy.phi.tolist())
        if step == config.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        batch_gradient(policy, correct, num_work, config.group_size, config.max_length, loss_config)
        optimizer.step()
    return history


def expected_flow(config: MechanismConfig) -> MechanismHistory:
    """The deterministic path of SGD on the *expected* gradient (no sampling), with the policy's mean lengths."""
    loss_config = arm_config(config.arm, config.max_length)
    theta = math.log(config.accuracy / (1 - config.accuracy))
    phi = np.full(2 if config.sees_correctness else 1, math.log(config.p_stop / (1 - config.p_stop)))
    history = MechanismHistory()
    for step in range(config.steps + 1):
        p = 1.0 / (1.0 + np.exp(-phi))
        history.accuracy.append(1.0 / (1.0 + math.exp(-theta)))
        history.length_correct.append(mean_length(float(p[0]), config.max_length))
        history.length_incorrect.append(mean_length(float(p[-1]), config.max_length))
        history.theta.append(theta)
        history.phi.append(phi.tolist())
        if step == config.steps:
            break
        grad = expected_gradient(theta, phi, config.max_length, config.group_size, loss_config)
        theta -= config.lr * grad.theta
        phi = phi - config.lr * grad.phi
    return history
