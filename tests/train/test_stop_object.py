"""The run's signal handling reaches the loop as an explicit object (:class:`~drgrpo.train.run.stopping.Stop`).

The policy update must hold signals from its first optimizer step to its end, through the ``stop`` it is given
(no global): a recording ``Stop`` checks where the deferred section starts and ends around the optimizer steps.
The behaviour with real signals is tested end to end in test_stopping.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from drgrpo import LossConfig
from drgrpo.train import TinyModelConfig, TrainConfig, build_model, build_tokenizer
from drgrpo.train.loop.rollout import Rollout
from drgrpo.train.loop.update import TrainState, policy_update
from drgrpo.train.run.stopping import NO_STOP, Watchdog

B, P, T = 4, 3, 5
TINY = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=32)


class RecordingStop:
    """A Stop that logs when its deferred section opens and closes."""

    watchdog: Watchdog | None = None

    def __init__(self, events: list[str]) -> None:
        self.events = events

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.events.append("defer")
        try:
            yield
        finally:
            self.events.append("end")


class LoggingSGD(torch.optim.SGD):
    def __init__(self, params, events: list[str]) -> None:
        super().__init__(params, lr=0.0)
        self.events = events

    def step(self, closure=None):  # type: ignore[override]
        self.events.append("optimizer.step")


def test_the_update_defers_signals_through_the_stop_it_is_given() -> None:
    g = torch.Generator().manual_seed(0)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    batch = Rollout(torch.randint(4, vocab, (B, P), generator=g), torch.ones(B, P, dtype=torch.long),
                    torch.randint(4, vocab, (B, T), generator=g), torch.ones(B, T, dtype=torch.long), [""] * B,
                    torch.zeros(B, dtype=torch.bool))  # fmt: skip
    model = build_model(TINY, tokenizer, seed=0)
    events: list[str] = []
    state = TrainState(model, model, LoggingSGD(model.parameters(), events), tokenizer, None, step=0)
    config = TrainConfig(ppo_epochs=3, micro_batch_size=2, prompts_per_step=2, group_size=2)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    policy_update(
        state,
        batch,
        advantages,
        LossConfig.preset("dr_grpo", max_completion_length=T),
        config,
        step=1,
        stop=RecordingStop(events),
    )
    # one deferred section, opened just before the first optimizer step and closed after the last
    assert events == ["defer", "optimizer.step", "optimizer.step", "optimizer.step", "end"]
    assert state.step == 1


def test_outside_a_run_nothing_is_deferred_and_no_call_is_bounded() -> None:
    assert NO_STOP.watchdog is None
    with NO_STOP.deferred():  # a no-op: installs nothing
        pass
