"""The trainer's policy update on a fixed rollout: micro-batch scaling, split invariance, and the fused path's memory.

The oracle of every gradient here is one plain :func:`drgrpo.policy_loss` call over the whole batch,
backpropagated through the same model, with no trainer code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from drgrpo import LossConfig, policy_loss
from drgrpo.train import TinyModelConfig, TrainConfig, build_model, build_tokenizer
from drgrpo.train.loop.rollout import Rollout, token_logp
from drgrpo.train.loop.update import TrainState, policy_update

B, P, T = 16, 4, 6
TINY = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=32)


class RecordingSGD(torch.optim.SGD):
    """Keeps a copy of every gradient at each step and leaves the parameters alone."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[override]
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def rollout(ragged: bool, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    vocab = len(build_tokenizer())
    prompt = torch.randint(4, vocab, (B, P), generator=g)
    completion = torch.randint(4, vocab, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g) if ragged else torch.full((B,), T)
    mask = (torch.arange(T) < lengths[:, None]).long()
    return Rollout(prompt, torch.ones(B, P, dtype=torch.long), completion.masked_fill(mask == 0, 0), mask,
                   [""] * B, torch.zeros(B, dtype=torch.bool))  # fmt: skip


def state_for(model, ref=None) -> TrainState:
    model = copy.deepcopy(model)
    return TrainState(model, model, RecordingSGD(model.parameters()), build_tokenizer(), ref, step=0)


def update_grads(model, batch, adv, loss, micro: int, **config) -> list[torch.Tensor]:
    state = state_for(model)
    cfg = TrainConfig(micro_batch_size=micro, grad_clip=0.0, temperature=0.8, **config)
    policy_update(state, batch, adv, loss, cfg, step=1)
    assert state.step == 1
    return state.optimizer.grads[-1]


def test_a_kl_penalty_needs_a_reference(model):
    with pytest.raises(ValueError, match=r"beta=0.04 > 0 needs a reference model"):
        update_grads(model, rollout(ragged=False), torch.zeros(B), LossConfig.preset("grpo"), micro=B)


def whole_batch_grads(model, batch, adv, loss) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    logp = token_logp(model, batch, 0.8)  # (B, T)
    policy_loss(logp, None, adv, batch.completion_mask, loss).loss.backward()
    return [p.grad for p in model.parameters()]


def assert_grads_close(a, b, rtol=1e-5):
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    assert flat_b.norm() > 0
    assert (flat_a - flat_b).norm() <= rtol * flat_b.norm(), float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY, build_tokenizer(), seed=0)


@pytest.mark.parametrize("name", ["trl.grpo", "trl.bnpo", "trl.dr_grpo"])
def test_per_call_presets_average_over_micro_batches(model, name):
    # equal micro-batches (same rows, same tokens): TRL's mean over K micro-batch losses is the whole batch's
    # loss, so K = 1 and K = 4 give the same gradient, and both equal the plain whole-batch gradient
    batch, adv = rollout(ragged=False), torch.randn(B, generator=torch.Generator().manual_seed(1))
    loss = LossConfig.preset(name)
    k1 = update_grads(model, batch, adv, loss, micro=B)
    k4 = update_grads(model, batch, adv, loss, micro=B // 4)
    assert_grads_close(k4, k1)
    assert_grads_close(k1, whole_batch_grads(model, batch, adv, loss))


@pytest.mark.parametrize("name", ["dr_grpo", "grpo", "dapo", "gspo"])
def test_split_invariant_presets_through_the_trainer(model, name):
    # uneven micro-batches (5, 5, 5, 1 rows) of ragged completions: one step normaliser, the whole batch's gradient
    batch, adv = rollout(ragged=True), torch.randn(B, generator=torch.Generator().manual_seed(2))
    loss = LossConfig.preset(name, max_completion_length=T, beta=0.0)
    assert_grads_close(update_grads(model, batch, adv, loss, micro=5), whole_batch_grads(model, batch, adv, loss))


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns whose memory holds all its elements (an expanded
    view of the weight, e.g. (b, H, V) over a (V, H) storage, holds no memory of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.shapes += [tuple(t.shape) for t in tensors if t.untyped_storage().nbytes() >= t.numel() * t.element_size()]
        return out


def logits_sized(shapes, rows: int, vocab: int) -> list[tuple[int, ...]]:
    """Shapes holding at least ``rows`` rows of ``vocab`` columns: a (b, T, V) logits tensor or larger."""
    return [s for s in shapes if len(s) >= 2 and s[-1] == vocab and torch.Size(s[:-1]).numel() >= rows]


@pytest.mark.parametrize("fused", [True, False])
def test_a_fused_step_never_builds_the_logits(model, fused):
    # two PPO epochs (old log-probs) and a reference model (ref log-probs): every log-prob of the step
    batch, adv = rollout(ragged=True), torch.randn(B, generator=torch.Generator().manual_seed(3))
    vocab = model.get_output_embeddings().weight.shape[0]
    assert vocab not in (P + T, TINY.hidden_size, TINY.intermediate_size)  # no other tensor ends in V columns
    state = state_for(model, ref=copy.deepcopy(model).requires_grad_(False))
    cfg = TrainConfig(micro_batch_size=8, ppo_epochs=2, fused=fused, temperature=0.8)
    loss = LossConfig.preset("grpo", beta=0.04)
    with Shapes() as seen:
        policy_update(state, batch, adv, loss, cfg, step=1)
    big = logits_sized(seen.shapes, rows=8 * T, vocab=vocab)  # one micro-batch: b = 8 rows of T tokens
    if fused:
        assert not big, big
        # the chunks hold only a micro-batch's real tokens
        micro_tokens = [int(batch.completion_mask[s : s + 8].sum()) for s in (0, 8)]
        chunks = [s for s in seen.shapes if len(s) == 2 and s[-1] == vocab]
        assert chunks and max(s[0] for s in chunks) <= max(micro_tokens) < 8 * T
    else:
        assert (8, P + T, vocab) in big  # the detector sees the logits path's (b, P + T, V) logits
