"""The trainer as a Python function on tiny settings: exact resume, failures, the real-model path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drgrpo.train import TrainConfig, train
from drgrpo.train.loop.task import make_splits, write_jsonl
from drgrpo.train.run.checkpoint import find_checkpoint, read_state
from helpers.tiny_configs import TINY_TASK, tiny


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def steps_of(run: Path) -> list[dict]:
    drop = {"time", "step_time", "tokens_per_s"}  # wall-clock fields differ run to run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if "reward" in r]


@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path) -> None:
    # two micro-batches and two PPO epochs per step: old log-probs, clipping and accumulation all matter
    cfg = dict(ppo_epochs=2, micro_batch_size=8)
    straight = train(tiny(tmp_path / "a", **cfg))
    first = train(tiny(tmp_path / "b", steps=3, **cfg))
    assert first.step == 3 and read_state(first.checkpoint)["step"] == 3
    resumed = train(tiny(tmp_path / "b", resume=str(tmp_path / "b"), **cfg))
    assert straight.step == resumed.step == 6

    w6, w33 = weights(straight.checkpoint), weights(resumed.checkpoint)
    w0 = load_file(str(tmp_path / "a" / "warm_start" / "model.safetensors"))
    assert set(w6) == set(w33)
    for name in w6:
        assert torch.equal(w6[name], w33[name]), name
    assert any(not torch.equal(w6[n], w0[n]) for n in w0)  # RL did change the weights
    # the optimizer state as well, and the logged metrics of every step
    o6 = torch.load(straight.checkpoint / "optimizer.pt", weights_only=True)["state"]
    o33 = torch.load(resumed.checkpoint / "optimizer.pt", weights_only=True)["state"]
    for k in o6:
        assert torch.equal(o6[k]["exp_avg"], o33[k]["exp_avg"])
        assert int(o6[k]["step"]) == int(o33[k]["step"]) == 12  # 6 steps x 2 epochs
    assert steps_of(tmp_path / "a") == steps_of(tmp_path / "b")


def test_checkpoint_contents(tmp_path: Path) -> None:
    result = train(tiny(tmp_path, steps=2, checkpoint_every=1))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000001", "step_000002"]
    assert find_checkpoint(tmp_path) == result.checkpoint == tmp_path / "checkpoints" / "step_000002"
    state = read_state(result.checkpoint)
    assert state["step"] == 2
    assert TrainConfig.from_dict(state["train_config"]) == tiny(tmp_path, steps=2, checkpoint_every=1)
    assert state["loss_config"]["aggregation"] == "seq-mean-token-sum-norm"
    assert state["loss_config"]["max_completion_length"] == 5  # L = max_new_tokens
    for f in ("model.safetensors", "optimizer.pt", "config.json", "tokenizer.json"):
        assert (result.checkpoint / f).is_file(), f
    # one resume mechanism: every step reseeds from (seed, step, rank), so no random-number state is saved,
    # and nothing in a checkpoint needs unpickling: the optimizer state loads with weights_only=True
    assert not list(result.checkpoint.glob("rng_*"))
    optimizer_state = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)
    assert set(optimizer_state) == {"state", "param_groups"} and optimizer_state["state"]


def test_real_model_path_with_reference_kl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_warm_model: Path
) -> None:
    # a local HF model directory + a JSONL dataset + rewards by name, GRPO with a KL penalty. The second reward
    # (shorter is better, weight 0.1) gives every group a signal, so the policy moves from step 1 on whatever
    # the sampled answers; the first (exact match) stays the accuracy.
    (tmp_path / "dense.py").write_text("def shorter(completion, example):\n    return -len(completion.split())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model_dir = tiny_warm_model
    train_ex, held = make_splits(TINY_TASK)
    write_jsonl([{"prompt": e["prompt"], "answer": e["answer"]} for e in train_ex], tmp_path / "train.jsonl")
    write_jsonl(held, tmp_path / "held.jsonl")
    cfg = tiny(
        tmp_path / "run",
        steps=3,
        model=str(model_dir),
        dataset=str(tmp_path / "train.jsonl"),
        eval_dataset=str(tmp_path / "held.jsonl"),
        eval_every=3,
        rewards=("drgrpo.train.loop.task:exact_match", "dense:shorter"),
        reward_weights=(1.0, 0.1),
        loss="grpo",
        loss_overrides=(("beta", 0.04),),
        ppo_epochs=1,
        micro_batch_size=4,
    )
    result = train(cfg)
    rows = steps_of(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl"] == 0.0  # the first rollout's policy is the reference itself
    assert rows[2]["kl"] > 0.0
    for r in rows:
        # one epoch: the policy is the sampling policy, so every ratio is exactly 1 and nothing is clipped
        assert r["ratio_mean"] == 1.0 and r["clip_frac_low"] == r["clip_frac_high"] == 0.0
        assert 1 <= r["length"] <= 5  # EOS included, within max_new_tokens
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["grad_norm"])
    assert [e["step"] for e in result.evals] == [0, 3]
    assert result.evals[0]["eval/num_prompts"] == 8
    assert read_state(result.checkpoint)["loss_config"]["beta"] == 0.04


@pytest.mark.slow
def test_fused_loss_path_matches_logits_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_warm_model: Path
) -> None:
    # the same run through drgrpo.fused (hidden states + output layer) and through full logits
    model_dir = tiny_warm_model
    cfg = dict(steps=2, model=str(model_dir), ppo_epochs=2, micro_batch_size=8, rewards=("dense:shorter",))
    (tmp_path / "dense.py").write_text("def shorter(completion, example):\n    return -len(completion.split())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = train(tiny(tmp_path / "plain", **cfg))
    fused = train(tiny(tmp_path / "fused", fused=True, **cfg))
    wp, wf, w0 = weights(plain.checkpoint), weights(fused.checkpoint), load_file(str(model_dir / "model.safetensors"))
    assert any(not torch.equal(wp[k], w0[k]) for k in w0)
    for k in wp:
        torch.testing.assert_close(wf[k], wp[k], rtol=1e-4, atol=1e-5)
    lp, lf = steps_of(tmp_path / "plain"), steps_of(tmp_path / "fused")
    for a, b in zip(lp, lf, strict=True):
        assert a["reward"] == b["reward"]  # same rollouts: same weights before each step
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4, abs_tol=1e-6)


def test_per_micro_batch_peer_preset_trains(tmp_path: Path) -> None:
    # trl.bnpo normalises each micro-batch by its own token count (TRL's definition): the trainer must run it
    # without a step normaliser, which the preset refuses. 16 completions in 4 micro-batches of 4.
    result = train(tiny(tmp_path / "bnpo", steps=2, loss="trl.bnpo", micro_batch_size=4))
    assert result.step == 2
    rows = steps_of(tmp_path / "bnpo")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
