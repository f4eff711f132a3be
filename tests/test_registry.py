"""The surrogate registry: one member in one place, and everything that lists the members reads it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from batches import random_batch
from drgrpo import LossConfig, group_advantages, policy_loss
from drgrpo import reference as ref
from drgrpo.registry import SURROGATES, Registry
from drgrpo.surrogates import Surrogate, SurrogateInputs, get_surrogate, register_surrogate, surrogate_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_registry():
    """Snapshot the surrogate registry and restore it after the test (tests add temporary members)."""
    before = SURROGATES.names()
    yield
    for name in SURROGATES.names():
        if name not in before:
            SURROGATES.remove(name)
    assert SURROGATES.names() == before


def test_registry_rejects_a_second_member_under_a_name_and_lists_names_on_a_miss():
    registry: Registry[int] = Registry("widget")
    registry.add("a", 1)
    registry.add("b", 2)
    with pytest.raises(ValueError, match=r"a widget named 'a' is already registered \(1\); pick another name"):
        registry.add("a", 3)
    assert registry.get("a") == 1 and registry.names() == ("a", "b")  # the first registration kept
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; valid widgets: a, b$"):
        registry.get("c")
    with pytest.raises(TypeError, match="a widget name must be a non-empty str, got ''"):
        registry.add("", 4)


def test_registering_a_taken_surrogate_name_fails_and_keeps_the_member(restore_registry):
    original = get_surrogate("ppo")
    with pytest.raises(ValueError, match="a surrogate named 'ppo' is already registered"):
        register_surrogate("ppo", oracle=ref.ppo_token_loss, formula="x", paper="y")(original.loss)
    assert get_surrogate("ppo") is original
    with pytest.raises(TypeError, match="pass exactly one of oracle and batch_oracle"):
        register_surrogate("twice", formula="x", paper="y")


def test_loss_config_accepts_exactly_the_registered_names():
    assert SURROGATES.names()[:3] == ("ppo", "cispo", "sapo")
    for name in SURROGATES.names():
        assert get_surrogate(name).name == name
    valid = ", ".join(repr(n) for n in SURROGATES.names())
    with pytest.raises(ValueError, match=f"^surrogate must be one of {valid}; got 'nope'$"):
        LossConfig(surrogate="nope")


def _reinforce_oracle(t: ref.OracleToken, config: LossConfig) -> float:
    return -t.adv * t.logp  # plain floats: REINFORCE, no ratio


def test_a_new_member_is_one_function_and_its_oracle(restore_registry):
    # Registered here, nowhere else: LossConfig, policy_loss and the reference all pick it up.
    @register_surrogate(
        "test_reinforce", oracle=_reinforce_oracle, formula="-A logp", paper="Williams 1992", frameworks="none"
    )
    def reinforce(x: SurrogateInputs, config: LossConfig) -> Surrogate:
        never = torch.zeros_like(x.ratio, dtype=torch.bool)
        return Surrogate(-x.adv * x.logp, never, never)

    batch = random_batch(seed=21, empty_rows=1)
    config = LossConfig(surrogate="test_reinforce", aggregation="token-mean")
    adv = group_advantages(batch.rewards, batch.group_size, config)
    logp = batch.logp.clone().requires_grad_()
    out = policy_loss(logp, batch.old_logp, adv, batch.mask, config)
    m = batch.mask.double().numpy()
    expected = ref.oracle_policy_loss(
        batch.logp.double().numpy(), batch.old_logp.double().numpy(), adv.numpy(), m, config
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # by hand: d loss / d logp = -A m / N_tok
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -adv.unsqueeze(1) * batch.mask / batch.mask.sum(), rtol=1e-13, atol=0)
    assert "`test_reinforce` | `-A logp`" in surrogate_table()


def test_a_batch_oracle_sees_whole_completions(restore_registry):
    # A member whose token loss depends on its row (here: -A times the row's mean log-prob on every token).
    def row_mean_oracle(rows: list[ref.OracleRow], config: LossConfig) -> list[list[float]]:
        out = []
        for row in rows:
            mean = math.fsum(t.logp for t in row.tokens) / max(len(row.tokens), 1)
            out.append([-t.adv * mean for t in row.tokens])
        return out

    @register_surrogate("test_row_mean", batch_oracle=row_mean_oracle, formula="-A mean_t logp", paper="none")
    def row_mean(x: SurrogateInputs, config: LossConfig) -> Surrogate:
        mean = (x.logp * x.mask).sum(-1, keepdim=True) / x.mask.sum(-1, keepdim=True).clamp_min(1)
        never = torch.zeros_like(x.ratio, dtype=torch.bool)
        return Surrogate(-x.adv * mean.expand_as(x.logp), never, never)

    batch = random_batch(seed=22, empty_rows=1)
    config = LossConfig(surrogate="test_row_mean", aggregation="seq-mean-token-mean")
    adv = group_advantages(batch.rewards, batch.group_size, config)
    out = policy_loss(batch.logp, batch.old_logp, adv, batch.mask, config)
    m = batch.mask.double().numpy()
    expected = ref.oracle_policy_loss(
        batch.logp.double().numpy(), batch.old_logp.double().numpy(), adv.numpy(), m, config
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_docs_table_is_the_registry():
    page = (ROOT / "docs" / "losses.md").read_text()
    assert surrogate_table() in page, "docs/losses.md differs from drgrpo.surrogates.surrogate_table()"
    for name in SURROGATES.names():
        assert f"| `{name}` |" in page
