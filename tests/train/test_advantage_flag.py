"""``drgrpo train --advantage NAME``: the run's advantages are that estimator's, and bad values are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from drgrpo import reference
from drgrpo.config import LossConfig
from drgrpo.field_error import FieldError
from drgrpo.train.cli.main import main
from drgrpo.train.loop import trainer
from drgrpo.train.train_config import TrainConfig
from helpers.cli_runs import TINY

LENGTH_REWARD = """
def length(completion, example):
    return len(completion) % 3 / 2
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rloo", "opo"])
def test_a_run_uses_the_estimator_it_names(name, tmp_path: Path, monkeypatch):
    seen: list[dict] = []
    real_estimator, real_update = trainer.global_outcome_advantages, trainer.policy_update

    def estimator(rewards, group_size, config, estimator, *, lengths=None):
        out = real_estimator(rewards, group_size, config, estimator, lengths=lengths)
        seen.append({"rewards": rewards.clone(), "lengths": lengths.clone(), "G": group_size, "name": estimator})
        return out

    def update(state, batch, advantages, *args, **kwargs):
        seen[-1].update(advantages=advantages.detach().double().clone(), batch_lengths=batch.lengths.clone())
        return real_update(state, batch, advantages, *args, **kwargs)

    monkeypatch.setattr(trainer, "global_outcome_advantages", estimator)
    monkeypatch.setattr(trainer, "policy_update", update)
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = ["--reward", "length_reward:length"]  # rewards that differ within a prompt (tiny model: rarely right)
    args = ["--steps", "2", "--eval-every", "0", "--advantage", name, *reward, *TINY]
    assert main(["train", "--output-dir", str(tmp_path / "run"), *args]) == 0
    assert len(seen) == 2
    for step in seen:
        assert (step["name"], step["G"]) == (name, 4)
        torch.testing.assert_close(step["lengths"], step["batch_lengths"].to(step["lengths"]), rtol=0, atol=0)
        want = reference.oracle_outcome_advantages(step["rewards"].numpy(), 4, name, lengths=step["lengths"].numpy())
        torch.testing.assert_close(step["advantages"], torch.from_numpy(want), rtol=1e-6, atol=1e-7)  # float32 loss
    assert any(float(s["advantages"].abs().max()) > 0 for s in seen)
    assert "advantage: " + name in (tmp_path / "run" / "config.yaml").read_text()


def test_grpo_is_the_presets_group_advantage():
    from drgrpo.advantages import group_advantages
    from drgrpo.distributed import global_outcome_advantages

    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.2, 0.2], dtype=torch.float64)
    for preset in ("dr_grpo", "grpo"):
        config = LossConfig.preset(preset, max_completion_length=4)
        got = global_outcome_advantages(rewards, 3, config, "grpo")
        torch.testing.assert_close(got, group_advantages(rewards, 3, config), rtol=0, atol=0)
        std = "group" if preset == "grpo" else "none"
        want = reference.oracle_group_advantages(rewards.numpy(), 3, std=std, eps=config.std_eps)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=1e-15)


@pytest.mark.slow
def test_bad_values_are_refused(tmp_path: Path, capsys):
    with pytest.raises(FieldError, match="advantage must be one of grpo, rloo"):
        TrainConfig(advantage="remax")  # type: ignore[arg-type]
    with pytest.raises(FieldError, match="group_size must be >= 2, got 1"):
        TrainConfig(advantage="grpo_passk", group_size=1)
    with pytest.raises(SystemExit) as exited:  # argparse: exit code 2 and its one-line message
        main(["train", "--output-dir", str(tmp_path / "a"), "--advantage", "remax", *TINY])
    assert exited.value.code == 2
    assert "argument --advantage: invalid choice 'remax' (choose from grpo, rloo," in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["train", "--output-dir", str(tmp_path / "b"), "--advantage", "grpo_passk", "--group-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grpo_passk" in err[0] and "group" in err[0]
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
