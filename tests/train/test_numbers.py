"""Numbers the trainer must not get silently wrong: rewards in float64 up to the advantages, groups without
signal in the metrics, rewards beyond float32's range, float16 (refused for training, fine for evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from drgrpo.train import TrainConfig, train
from drgrpo.train.loop.data import RewardError, Rewards
from drgrpo.train.loop.evaluation import evaluate_model
from drgrpo.train.train_config import EvalConfig
from helpers.tiny_configs import TINY_TASK, tiny

SIGNAL = """
def parity(completion, example):
    return float(len(completion.split()) % 2)  # 0 or 1: completions of a group differ in length


def shifted(completion, example):
    return 1e8 + parity(completion, example)  # float32 cannot tell 1e8 from 1e8 + 1


def constant(completion, example):
    return 3.0
"""


def numpy_advantages(rewards: list[float], group_size: int) -> np.ndarray:
    """Dr. GRPO's advantages, the float64 oracle: r - mean(r) per group, then float32 as the loss uses them."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1).astype(np.float32)


def recorded_run(run: Path, monkeypatch: pytest.MonkeyPatch, reward: str) -> tuple[list, list, list[dict]]:
    """train() on the tiny task for 3 steps; (rewards, advantages) of every step and the metrics lines."""
    import drgrpo.train.loop.trainer as trainer
    from drgrpo.train.loop.data import Rewards

    rewards, advantages = [], []
    real_score, real_update = Rewards.__call__, trainer.policy_update

    def score(self, *args, **kwargs):  # the step's rewards (the runs here do not evaluate)
        totals, firsts = real_score(self, *args, **kwargs)
        rewards.append(list(totals))
        return totals, firsts

    def policy_update(state, batch, adv, *args, **kwargs):
        advantages.append(adv.detach().clone())
        return real_update(state, batch, adv, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Rewards, "__call__", score)
        patch.setattr(trainer, "policy_update", policy_update)
        train(tiny(run, steps=3, rewards=(reward,)))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return rewards, advantages, lines


@pytest.mark.slow
def test_rewards_stay_float64_up_to_the_advantages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "signal_rewards.py").write_text(SIGNAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    r1, a1, m1 = recorded_run(tmp_path / "plain", monkeypatch, "signal_rewards:parity")
    r2, a2, m2 = recorded_run(tmp_path / "shifted", monkeypatch, "signal_rewards:shifted")
    assert [[x + 1e8 for x in step] for step in r1] == r2  # the same completions, rewards shifted by 1e8
    for rewards, advantages in zip(r1 + r2, a1 + a2, strict=True):
        assert advantages.dtype == torch.float32  # cast to the loss's dtype after the float64 arithmetic
        np.testing.assert_array_equal(advantages.numpy(), numpy_advantages(rewards, 4))
    assert any(bool(a.ne(0).any()) for a in a1)  # the test has a signal to lose
    for x, y in zip(a1, a2, strict=True):
        assert torch.equal(x, y)  # the advantages of 1e8 + r are those of r
    w1 = load_file(str(tmp_path / "plain" / "checkpoints" / "step_000003" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "shifted" / "checkpoints" / "step_000003" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # so is every update
    # groups whose advantages are all 0 are counted from the advantages the loss got (oracle: numpy)
    for line, rewards in zip(m2, r2, strict=True):
        expected = (numpy_advantages(rewards, 4).reshape(-1, 4) == 0).all(axis=1).mean()
        assert line["frac_groups_no_signal"] == expected
    assert [x["frac_groups_no_signal"] for x in m1] == [x["frac_groups_no_signal"] for x in m2]


@pytest.mark.slow
def test_a_step_without_signal_shows_in_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "signal_rewards.py").write_text(SIGNAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, advantages, lines = recorded_run(tmp_path / "run", monkeypatch, "signal_rewards:constant")
    assert all(not bool(a.any()) for a in advantages)  # every advantage is exactly 0
    assert [x["frac_groups_no_signal"] for x in lines] == [1.0, 1.0, 1.0]


def test_reward_and_weighted_total_beyond_the_limit_name_the_reward() -> None:
    limit = float(torch.finfo(torch.float32).max) / 2
    ex = [{"prompt": "1 + 1 =", "answer": "2"}]
    big = Rewards(("mod:big",), (lambda c, e: 1e39,), (1.0,))
    with pytest.raises(
        RewardError, match=r"reward mod:big returned 1e\+39, beyond 1\.7e\+38.*completion 0 of the batch"
    ):
        big(["2"], ex, [7], limit)
    assert big(["2"], ex, [7]) == ([1e39], [1e39])  # no limit (evaluation): a float64 number like any other
    weighted = Rewards(("mod:a", "mod:b"), (lambda c, e: 1.0, lambda c, e: 1e30), (1.0, 1e9))
    message = r"the weighted reward 1\.0 \* mod:a \+ 1000000000\.0 \* mod:b is 1\.0+1e\+39, beyond"  # 1e9 * 1e30
    with pytest.raises(RewardError, match=message):
        weighted(["2"], ex, [7], limit)
    overflow = Rewards(("mod:a",), (lambda c, e: 1e300,), (1e300,))
    with pytest.raises(RewardError, match=r"the weighted reward .* is inf"):
        overflow(["2"], ex, [7])  # beyond float64 itself: never a silent inf


@pytest.fixture
def tiny_model(tiny_warm_model: Path) -> Path:
    return tiny_warm_model  # (conftest.py: made once for the session)


def test_float16_is_refused_for_training_before_any_work(tmp_path: Path, tiny_model: Path) -> None:
    config = tiny(tmp_path / "out", model=str(tiny_model), dtype="float16")
    with pytest.raises(ValueError, match="dtype float16 cannot train: AdamW on float16 weights"):
        train(config)
    assert not (tmp_path / "out").exists()


def test_float16_evaluation_matches_float32(tiny_model: Path) -> None:
    # drgrpo eval --dtype float16 still works (inference needs no optimizer); greedy answers of this small model
    # are the same in float16 and float32 on the held-out split
    base = TrainConfig(task=TINY_TASK, eval_size=16, max_new_tokens=5)
    f32 = evaluate_model(tiny_model, EvalConfig(model=str(tiny_model)).train_config(base))
    f16 = evaluate_model(tiny_model, EvalConfig(model=str(tiny_model), dtype="float16").train_config(base))
    assert f16["eval/num_prompts"] == f32["eval/num_prompts"] == 16
    assert math.isclose(f16["eval/accuracy"], f32["eval/accuracy"], abs_tol=2 / 16)


def test_float16_is_refused_by_compare_before_the_warm_start(tmp_path: Path) -> None:
    from drgrpo.train.cli.compare import CompareConfig, compare

    with pytest.raises(ValueError, match="dtype float16 cannot train"):
        compare(CompareConfig(output_dir=str(tmp_path / "cmp"), train=TrainConfig(dtype="float16", progress=False)))
    assert not (tmp_path / "cmp").exists()


def test_compare_refuses_a_non_finite_beta() -> None:
    from drgrpo.train.cli.compare import CompareConfig

    with pytest.raises(ValueError, match=r"^beta must be a finite number, got nan"):
        CompareConfig(beta=math.nan)
