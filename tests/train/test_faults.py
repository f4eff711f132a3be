"""Nothing lost on a crash: fault injection, then resume, then the weights of an uninterrupted run, bit for bit.

Every scenario runs the tiny built-in setting for 6 steps, breaks it at one moment, resumes it with
``drgrpo train --resume RUN`` and compares the final weights, optimizer state and metrics with an
uninterrupted run of the same configuration. Exceptions (a reward that raises, a NaN loss, an
out-of-memory error) must leave the last completed step on disk and exit non-zero with the cause; a
SIGKILL (no chance to save) must leave the checkpoints consistent, whatever it interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import ENV, TINY

from drgrpo.train import train
from drgrpo.train.checkpoint import find_checkpoint, read_state
from drgrpo.train.cli import main

STEPS = ["--steps", "6", "--eval-every", "0", "--checkpoint-every", "2"]
TIMING = {"time", "step_time", "tokens_per_s"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 0
    return run


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_end(run: Path, reference: Path) -> None:
    """The run ended exactly where the uninterrupted one did, and left no temporary files."""
    final, expected = find_checkpoint(run), find_checkpoint(reference)
    assert final.name == expected.name == "step_000006"
    a, b = load_file(str(final / "model.safetensors")), load_file(str(expected / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(final / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(expected / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]) for k in ob)
    assert metrics(run) == metrics(reference)  # every step logged once, with the same values
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def resume(run: Path, path: Path | None = None) -> None:
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(path or ""), ENV.get("PYTHONPATH", "")]))}
    p = subprocess.run(
        [sys.executable, "-m", "drgrpo", "train", "--resume", str(run), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]


# --------------------------------------------------------------------------- exceptions inside a step

FLAKY = """
import os
from drgrpo.train.task import exact_match

CALLS = 0


def right(completion, example):
    global CALLS
    CALLS += 1
    if CALLS == 3 * 16 + 5 and not os.path.exists(MARKER):  # step 4 (16 completions a step), once
        open(MARKER, "w").close()
        return completion.count(".") / 0
    return exact_match(completion, example)
"""


def test_a_reward_that_raises(tmp_path: Path, reference: Path, monkeypatch, capsys):
    module = tmp_path / "raising_reward.py"
    module.write_text(FLAKY.replace("MARKER", repr(str(tmp_path / "raised"))))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    code = main(["train", "--output-dir", str(run), *STEPS, *TINY, "--reward", "raising_reward:right"])
    err = capsys.readouterr().err
    assert code == 1
    # the cause, with the traceback of the user's own reward, not the trainer's internals
    assert "reward raising_reward:right raised ZeroDivisionError: division by zero on example #" in err
    assert f'File "{module}", line 13, in right' in err and "return completion.count" in err
    assert "trainer.py" not in err and "data.py" not in err
    # the last completed step (3) is on disk although checkpoints come every 2 steps
    assert "step 4 failed (RewardError); the last completed step is saved in" in err
    assert read_state(find_checkpoint(run))["step"] == 3
    resume(run, tmp_path)
    assert_same_end(run, reference)


def test_a_nan_loss(tmp_path: Path, reference: Path, monkeypatch, capsys):
    import drgrpo.train.update as update

    real, calls = update.policy_loss, []

    def nan_at_step_4(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 7:  # two micro-batches a step: the seventh call is the first of step 4
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(update, "policy_loss", nan_at_step_4)
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 1
    err = capsys.readouterr().err
    assert "FloatingPointError: step 4: the gradient norm is nan (loss nan)" in err
    assert "the weights were not updated" in err
    assert read_state(find_checkpoint(run))["step"] == 3
    monkeypatch.setattr(update, "policy_loss", real)
    resume(run)
    assert_same_end(run, reference)


def poison_weights_at(monkeypatch, optimizer_step: int) -> None:
    """Fault injection: the RL optimizer's ``optimizer_step``-th step (1-based) leaves a NaN in a weight."""
    from drgrpo.train.config import TrainConfig

    make = TrainConfig.optimizer

    def optimizer(self, params):
        opt = make(self, params)
        real, calls = opt.step, []

        def step(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == optimizer_step:
                with torch.no_grad():
                    opt.param_groups[0]["params"][1].view(-1)[7] = float("nan")
            return out

        opt.step = step
        return opt

    monkeypatch.setattr(TrainConfig, "optimizer", optimizer)


def test_non_finite_weights_are_never_saved(tmp_path: Path, reference: Path, monkeypatch, capsys):
    # the optimizer step of step 4 leaves a NaN in the weights (after AdamW's real step): the failure keeps the
    # last good checkpoint (step 2), never saves the poisoned weights, and a resume ends like the reference
    poison_weights_at(monkeypatch, 4)
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 1
    err = capsys.readouterr().err
    assert "FloatingPointError: step 4: the optimizer step made the weights non-finite (model." in err
    assert "the learning rate is too large for the weights' dtype (--lr 0.01, --dtype float32)" in err
    assert "step 4 failed (FloatingPointError) while updating the weights (not saved); the last checkpoint is" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]
    saved = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in saved.values())
    monkeypatch.undo()
    resume(run)
    assert_same_end(run, reference)


def test_an_out_of_memory_error(tmp_path: Path, reference: Path, monkeypatch, capsys):
    import drgrpo.train.trainer as trainer
    from drgrpo.train.cli import train_config_from_args
    from drgrpo.train.flags import parse_with_config

    real, calls = trainer.generate, []

    def oom_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("injected: out of memory in the rollout of step 5")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "generate", oom_at_step_5)
    run = tmp_path / "run"
    config = train_config_from_args(
        parse_with_config(trainer_parser(), ["train", "--output-dir", str(run), *STEPS, *TINY])
    )
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        train(config)
    assert "step 5 failed (OutOfMemoryError); the last completed step is saved in" in capsys.readouterr().err
    assert read_state(find_checkpoint(run))["step"] == 4  # saved by the schedule (every 2 steps): not rewritten
    monkeypatch.setattr(trainer, "generate", real)
    resume(run)
    assert_same_end(run, reference)


def trainer_parser():
    from drgrpo.train.cli import build_parser

    return build_parser()


# --------------------------------------------------------------------------- SIGKILL at several moments

DRIVER = """
import os, signal, sys
import importlib

module = importlib.import_module(sys.argv[1])
owner = module
path = sys.argv[2].split(".")
for part in path[:-1]:
    owner = getattr(owner, part)
real = getattr(owner, path[-1])
calls, kill_at, when = [0], int(sys.argv[3]), sys.argv[4]


def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if calls[0] == kill_at and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out


setattr(owner, path[-1], wrapped)
from drgrpo.train.cli import main

sys.exit(main(sys.argv[5:]))
"""

MOMENTS = {
    # (module, attribute, call, before/after, what the kill leaves in checkpoints/): checkpoints after steps 2, 4, 6
    "rollout of step 5": ("drgrpo.train.trainer", "generate", 5, "before", ["latest", "step_000002", "step_000004"]),
    "policy update of step 3": ("torch.nn.utils", "clip_grad_norm_", 3, "before", ["latest", "step_000002"]),
    "after the metrics line of step 4, before its checkpoint": (
        "drgrpo.train.metrics", "MetricsLog.__call__", 4, "after", ["latest", "step_000002"]
    ),
    "checkpoint 2 half-written (weights, no optimizer)": (
        "torch", "save", 2, "before", [".tmp_step_000004", "latest", "step_000002"]
    ),
    "checkpoint 2 written, not yet renamed into place": (
        "drgrpo.train.checkpoint", "publish", 2, "before", [".tmp_step_000004", "latest", "step_000002"]
    ),
    "checkpoint 2 renamed, latest not yet updated": (
        "drgrpo.train.checkpoint", "point_latest", 2, "before", ["latest", "step_000002", "step_000004"]
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill(tmp_path: Path, reference: Path, moment: str):
    module, attribute, call, when, left = MOMENTS[moment]
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(run), *STEPS, *TINY]
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, module, attribute, str(call), when, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert p.returncode == -9, (moment, p.returncode, p.stderr[-2000:])
    # the kill came where intended: what it left (temporary directories lose their process-id suffix here)
    survivors = sorted(
        p.name.rsplit("_", 1)[0] if p.name.startswith(".") else p.name for p in (run / "checkpoints").iterdir()
    )
    assert survivors == left, moment
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000002" or (latest == "step_000004" and moment == "rollout of step 5")
    resume(run)
    assert_same_end(run, reference)
    assert os.path.isfile(run / "config.yaml")
