"""Nothing lost on a crash: fault injection, then resume, then the weights of an uninterrupted run, bit for bit.

Every scenario runs the tiny built-in setting for 6 steps, breaks it at one moment, resumes it with
``drgrpo train --resume RUN`` and compares the final weights, optimizer state and metrics with an
uninterrupted run of the same configuration (the ``reference`` fixture, conftest.py). Exceptions (a reward
that raises, a NaN loss, an out-of-memory error) must leave the last completed step on disk and exit non-zero
with the cause; a SIGKILL (no chance to save) must leave the checkpoints consistent, whatever it interrupted.
A kill inside the checkpoint write is reproduced in this process (:class:`Killed`, which no ``except Exception``
catches, so nothing runs after it that a SIGKILL would have prevented); a kill elsewhere in a step is a real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drgrpo.train import train
from drgrpo.train.cli.main import main
from drgrpo.train.run.checkpoint import find_checkpoint, read_state
from helpers.cli_runs import ENV, STEPS, TINY, assert_same_end, poison_weights_at


def resume(run: Path) -> None:
    """``drgrpo train --resume RUN`` in this process (a resume needs no process of its own: every step reseeds
    from (seed, step, rank), so nothing of this process's past carries into it)."""
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


# --------------------------------------------------------------------------- exceptions inside a step

FLAKY = """
import os
from drgrpo.train.loop.task import exact_match

CALLS = 0


def right(completion, example):
    global CALLS
    CALLS += 1
    if CALLS == 3 * 16 + 5 and not os.path.exists(MARKER):  # step 4 (16 completions a step), once
        open(MARKER, "w").close()
        return completion.count(".") / 0
    return exact_match(completion, example)
"""


@pytest.mark.slow
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
    resume(run)  # the module is imported already, and its marker makes it raise no more
    assert_same_end(run, reference)


@pytest.mark.slow
def test_a_nan_loss(tmp_path: Path, reference: Path, monkeypatch, capsys):
    import drgrpo.train.loop.update as update

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_an_out_of_memory_error(tmp_path: Path, reference: Path, monkeypatch, capsys):
    import drgrpo.train.loop.trainer as trainer
    from drgrpo.train.cli.main import train_config_from_args
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
    from drgrpo.train.cli.main import build_parser

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
from drgrpo.train.cli.main import main

sys.exit(main(sys.argv[5:]))
"""

MOMENTS = {
    # (module, attribute, call, before/after, what the kill leaves in checkpoints/): checkpoints after steps 2, 4, 6
    "rollout of step 5": (
        "drgrpo.train.loop.trainer", "generate", 5, "before", ["latest", "step_000002", "step_000004"]
    ),
    "policy update of step 3": ("torch.nn.utils", "clip_grad_norm_", 3, "before", ["latest", "step_000002"]),
    "after the metrics line of step 4, before its checkpoint": (
        "drgrpo.train.run.metrics_log", "MetricsLog.__call__", 4, "after", ["latest", "step_000002"]
    ),
}  # fmt: skip
"""The kills outside the checkpoint write, each in a real process (those inside it: ``WRITE_MOMENTS``)."""


def survivors(run: Path) -> list[str]:
    """What is in ``run/checkpoints`` (temporary directories lose their process-id suffix)."""
    return sorted(
        p.name.rsplit("_", 1)[0] if p.name.startswith(".") else p.name for p in (run / "checkpoints").iterdir()
    )


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
    assert survivors(run) == left, moment
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000002" or (latest == "step_000004" and moment == "rollout of step 5")
    resume(run)
    assert_same_end(run, reference)
    assert os.path.isfile(run / "config.yaml")


# --------------------------------------------------------------------------- a kill inside the checkpoint write


class Killed(BaseException):
    """A SIGKILL in this process: no ``except Exception`` catches it (no clean-up, no save after a failure), the
    run's files are left as the kill left them."""


WRITE_MOMENTS = {
    # (module, attribute, call, what the kill leaves in checkpoints/): the 2nd write is step 4's
    "checkpoint 2 half-written (weights, no optimizer)": (
        "torch", "save", 2, [".tmp_step_000004", "latest", "step_000002"]
    ),
    "checkpoint 2 written, not yet renamed into place": (
        "drgrpo.train.run.checkpoint", "publish", 2, [".tmp_step_000004", "latest", "step_000002"]
    ),
    "checkpoint 2 renamed, latest not yet updated": (
        "drgrpo.train.run.checkpoint", "point_latest", 2, ["latest", "step_000002", "step_000004"]
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(WRITE_MOMENTS))
def test_a_kill_inside_the_checkpoint_write(tmp_path: Path, reference: Path, monkeypatch, moment: str):
    import importlib

    module, attribute, call, left = WRITE_MOMENTS[moment]
    owner, calls = importlib.import_module(module), []
    real = getattr(owner, attribute)

    def killed_at_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed(moment)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, killed_at_call)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        main(["train", "--output-dir", str(run), *STEPS, *TINY])
    monkeypatch.undo()
    assert survivors(run) == left, moment  # what a SIGKILL there leaves
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"  # never a half-written one
    # the run's checkpoint is its newest complete one: step 4 once renamed into place, else step 2
    assert find_checkpoint(run).name == ("step_000004" if "step_000004" in left else "step_000002")
    resume(run)
    assert_same_end(run, reference)  # (and no temporary directory left: the resume removed it)
    assert os.path.isfile(run / "config.yaml")
