"""One run per directory, and a run's history kept: the lock, resume, branch, and the flags a resume may change."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from drgrpo.config import LossConfig
from drgrpo.train.cli.main import main
from drgrpo.train.loop.task import TaskConfig
from drgrpo.train.loop.tiny import TinyModelConfig
from drgrpo.train.run.checkpoint import checkpoints_of, find_checkpoint, read_state
from drgrpo.train.run.resume import config_changes
from drgrpo.train.run.runlock import LOCK_FILE, RunInUse, RunLock
from drgrpo.train.train_config import TrainConfig, WarmStartConfig, on_resume
from helpers.cli_runs import STEPS, TINY, assert_same_end, launch, metrics, torchrun, tree, wait_for

GATE_REWARD = """
import os, time
from drgrpo.train.loop.task import exact_match

CALLS = 0


def right(completion, example):
    global CALLS
    CALLS += 1
    if CALLS == 3 * 16 + 1:  # the first call of step 4 (16 a step): wait for the test
        open(MARKER, "w").close()
        while not os.path.exists(GO):
            time.sleep(0.05)
    return exact_match(completion, example)
"""


def gated(tmp_path: Path) -> None:
    """tmp_path/gate_reward.py: exact match, which stops at step 4 until tmp_path/go exists."""
    text = GATE_REWARD.replace("MARKER", repr(str(tmp_path / "marker"))).replace("GO", repr(str(tmp_path / "go")))
    (tmp_path / "gate_reward.py").write_text(text)


def copy_of(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


# --------------------------------------------------------------------------- one run per directory


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path: Path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    second = RunLock(tmp_path / "run")
    with pytest.raises(RunInUse) as info:
        second.acquire()
    message = str(info.value)
    assert message.startswith(f"--output-dir {str(tmp_path / 'run')!r} is in use by another run (pid {os.getpid()} ")
    assert f"on host {socket.gethostname()} since " in message and "\n" not in message
    first.release()  # the holder ends: the lock goes with it, the file stays
    assert (tmp_path / "run" / LOCK_FILE).is_file()
    second.acquire()
    second.release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--output-dir '.*file' is a file, not a directory"):
        RunLock(tmp_path / "file").acquire()


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_is_refused_while_the_first_completes(
    tmp_path: Path, reference: Path, capsys
):
    gated(tmp_path)
    run = tmp_path / "run"
    first = launch(["--output-dir", str(run), *STEPS, *TINY, "--reward", "gate_reward:right"], tmp_path)
    try:
        wait_for(tmp_path / "marker", first)  # the first run is at step 4, holding the directory
        assert main(["train", "--output-dir", str(run), *STEPS, *TINY, "--seed", "1"]) == 2  # another process
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"drgrpo train: error: --output-dir {str(run)!r} is in use by another run (pid ")
        assert f"(pid {first.pid} on host {socket.gethostname()} since " in lines[0]
        assert "gate_reward:right" in lines[0]  # the holder's command
        assert first.poll() is None  # refused at once, while the first run goes on
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert_same_end(run, reference)  # the first run's files are its own, whole
    assert "seed: 0" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_a_killed_run_does_not_block_the_next(tmp_path: Path, reference: Path, monkeypatch):
    gated(tmp_path)
    run = tmp_path / "run"
    proc = launch(["--output-dir", str(run), *STEPS, *TINY, "--reward", "gate_reward:right"], tmp_path)
    wait_for(tmp_path / "marker", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # the lock file stays, naming the dead
    (tmp_path / "go").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # not blocked: the lock died with its holder
    assert_same_end(run, reference)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] != proc.pid


@pytest.mark.slow
def test_torchrun_into_a_directory_in_use_stops_every_process(tmp_path: Path):
    # process 0 cannot take the lock; process 1 must learn it and stop too, not wait for process 0 forever
    holder = RunLock(tmp_path / "run")
    holder.acquire()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "drgrpo",
           "train", "--output-dir", str(tmp_path / "run"), *STEPS, *TINY]  # fmt: skip
    try:
        returncode, err = torchrun(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    finally:
        holder.release()
    assert returncode != 0
    assert "is in use by another run (pid" in err
    assert "refused on process 0 (see its error)" in err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_a_new_run_into_a_directory_holding_a_run_is_refused(tmp_path: Path, reference: Path, capsys):
    run = copy_of(reference, tmp_path)
    before = tree(run)
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {run} already holds a run (checkpoints up to step_000006); one run per directory: " \
        f"continue it with --resume {run}, or start the new run in another --output-dir" in err  # fmt: skip
    assert tree(run) == before  # nothing written but the lock's note


# --------------------------------------------------------------------------- resume keeps history


@pytest.mark.slow
def test_resuming_an_older_checkpoint_is_refused_and_a_branch_leaves_the_old_run_alone(
    tmp_path: Path, reference: Path, capsys
):
    run = copy_of(reference, tmp_path)
    before = tree(run)
    older = run / "checkpoints" / "step_000002"
    assert main(["train", "--resume", str(older)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"drgrpo train: error: --resume {older} is step 2 of the run in {run}, whose newest checkpoint is step 6 "
        f"({run / 'checkpoints' / 'step_000006'}): continuing from step 2 there would overwrite the steps after it. "
        f"Continue the run from step 6 with --resume {run}, or branch from step 2 into a new run: --resume {older} "
        "--output-dir NEW_DIR"
    )
    assert tree(run) == before  # untouched

    branch = tmp_path / "branch"
    assert main(["train", "--resume", str(older), "--output-dir", str(branch)]) == 0
    assert tree(run) == before  # the old run is only read
    old_lines = (run / "metrics.jsonl").read_text().splitlines()
    new_lines = (branch / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in old_lines if json.loads(x)["step"] <= 2]
    assert new_lines[: len(kept)] == kept  # the branch starts with the old run's history, to the byte
    assert_same_end(branch, reference)  # and, with the same flags, continues exactly as the run did
    assert [p.name for p in checkpoints_of(branch / "checkpoints")] == ["step_000004", "step_000006"]
    (entry,) = read_state(find_checkpoint(branch))["history"]
    assert entry["step"] == 2 and entry["branch"] is True and entry["changed"] == {}
    assert entry["from"] == str(older.resolve())
    assert f"# branched at step 2 from {older.resolve()} (" in (branch / "config.yaml").read_text()

    # a branch needs a new directory: one holding a run is refused
    assert main(["train", "--resume", str(older), "--output-dir", str(branch)]) == 2
    assert f"--output-dir {branch} already holds a run (checkpoints up to step_000006)" in capsys.readouterr().err


@pytest.mark.slow
def test_flags_that_change_what_a_run_computes_are_refused_on_resume(tmp_path: Path, reference: Path, capsys):
    run = copy_of(reference, tmp_path)
    before = tree(run)
    given = ["--group-size", "2", "--seed", "1", "--loss", "grpo", "--dtype", "bfloat16", "--task-max-operand", "7",
             "--lr", "0.001", "--steps", "8", "--checkpoint-every", "1"]  # fmt: skip
    assert main(["train", "--resume", str(run), *given]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(
        f"drgrpo train: error: --resume {run}: --group-size 4 -> 2, --lr 0.01 -> 0.001, --seed 0 -> 1, "
        "--dtype float32 -> bfloat16, --task-max-operand 9 -> 7, --loss dr_grpo -> grpo (the run's value -> the "
        "value given) would change what the run computes, so it cannot continue with them in its own directory. "
        "Leave them out to continue the run as it was, or start a branch with them: --resume "
        f"{run / 'checkpoints' / 'step_000006'} --output-dir NEW_DIR"
    ), err
    assert "--steps" not in err and "--checkpoint-every" not in err  # these do not change what it computes
    # the model comes from the checkpoint: refused even on a branch
    assert main(["train", "--resume", str(run), "--output-dir", str(tmp_path / "b"), "--model", str(run)]) == 2
    assert f"--model none -> {run}: the checkpoint settles the model" in capsys.readouterr().err
    assert tree(run) == before
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_flags_that_do_not_are_accepted_and_recorded(tmp_path: Path, reference: Path):
    run = copy_of(reference, tmp_path)
    args = ["train", "--resume", str(run), "--steps", "8", "--checkpoint-every", "1", "--keep-checkpoints", "2",
            "--reward-timeout", "60", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert [p.name for p in checkpoints_of(run / "checkpoints")] == ["step_000007", "step_000008"]  # the newest 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000008"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    (entry,) = read_state(run / "checkpoints" / "step_000008")["history"]
    assert entry["changed"] == {"steps": [6, 8], "checkpoint-every": [2, 1], "keep-checkpoints": [0, 2],
                                "reward-timeout": [0.0, 60.0]}  # fmt: skip
    config = (run / "config.yaml").read_text()
    assert "\nsteps: 8\n" in config and "\ncheckpoint-every: 1\n" in config  # what the run uses now
    assert (
        f"# resumed at step 6 from {(run / 'checkpoints' / 'step_000006').resolve()} (" in config
        and "): --steps 6 -> 8, --checkpoint-every 2 -> 1, --keep-checkpoints 0 -> 2, --reward-timeout 0.0 -> 60.0\n"
        in config
    )
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert metrics(run)[:6] == metrics(reference)


@pytest.mark.slow
def test_a_branch_may_change_what_the_run_computes_and_records_it(tmp_path: Path, reference: Path):
    branch = tmp_path / "branch"
    older = reference / "checkpoints" / "step_000004"
    assert main(["train", "--resume", str(older), "--output-dir", str(branch), "--lr", "0.002"]) == 0
    rows = metrics(branch)
    assert rows[:4] == metrics(reference)[:4] and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[4]["lr"] == 0.002 and rows[3]["lr"] == 0.01  # the branch's steps use the new value
    (entry,) = read_state(find_checkpoint(branch))["history"]
    assert entry["changed"] == {"lr": [0.01, 0.002]} and entry["branch"] is True
    assert "): --lr 0.01 -> 0.002\n" in (branch / "config.yaml").read_text()


def another_value(name: str, value: Any) -> Any:
    """A valid value of TrainConfig field ``name`` other than ``value`` (its default), from its annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        return next(choice for choice in args if choice != value)
    if typing.get_origin(hint) is tuple:
        return {str: ("m:f",), float: (0.5,)}[args[0]]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if value is None or isinstance(value, str):
        return (value or "") + "x"
    raise AssertionError(f"TrainConfig.{name}: give the test a new value of {hint} (NESTED_CHANGES)")


NESTED_CHANGES = {
    "task": ("task-max-operand", TaskConfig(max_operand=20), (49, 20)),
    "warm_start": ("tiny-hidden-size", WarmStartConfig(model=TinyModelConfig(hidden_size=32)), (64, 32)),
}
"""A new value of each nested configuration of TrainConfig: (the flag that differs, the value, its leaf's old and
new value)."""


@pytest.mark.slow
def test_every_train_flag_is_classified_for_resume(monkeypatch):
    # every field says what a resume does with it, where it is defined; one without a class is named
    fields = dataclasses.fields(TrainConfig)
    assert {on_resume(f.name) for f in fields} == {"meaning", "checkpoint", "free"}
    lr = next(f for f in fields if f.name == "lr")
    monkeypatch.setattr(lr, "metadata", types.MappingProxyType({}))
    with pytest.raises(TypeError, match=r"^TrainConfig field 'lr' has no resume class: define it as lr: \.\.\. = "):
        on_resume("lr")
    monkeypatch.undo()
    # one new value per field (and per nested field): each must come back as its own flag, with its class
    base = TrainConfig()
    for f in fields:
        if f.name in ("output_dir", "resume", "loss", "loss_overrides"):  # where the run is; the loss: below
            continue
        if f.name in NESTED_CHANGES:
            flag, value, (old, new) = NESTED_CHANGES[f.name]
        else:
            value = another_value(f.name, getattr(base, f.name))
            flag, old, new = {"rewards": "reward"}.get(f.name, f.name.replace("_", "-")), getattr(base, f.name), value
        (change,) = config_changes(base, base.replace(**{f.name: value}))
        assert (change.flag, change.kind, change.old, change.new) == (flag, on_resume(f.name), old, new), f.name
    # the loss: its preset, and every LossConfig field as its own flag
    assert [str(c) for c in config_changes(base, base.replace(loss="grpo"))] == ["--loss dr_grpo -> grpo"]
    for f in dataclasses.fields(LossConfig):
        if f.name in ("name", "per_call_normalization", "max_completion_length"):  # not loss flags
            continue
        old = getattr(base.loss_config(), f.name)
        new = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.5 if v < 0.5 else v - 0.5}.get(
            type(old)
        )  # a valid other value (top_entropy_quantile is at most 1)
        if new is None:
            continue
        changed = config_changes(base, base.replace(loss_overrides=((f.name, new(old)),)))
        assert [(c.flag, c.kind) for c in changed] == [(f.name.replace("_", "-"), "meaning")], f.name


# --------------------------------------------------------------------------- a run in progress is only read


@pytest.mark.slow
def test_eval_and_plot_read_a_run_in_progress(tmp_path: Path, monkeypatch, capsys):
    gated(tmp_path)
    run = tmp_path / "run"
    proc = launch(["--output-dir", str(run), *STEPS, *TINY, "--reward", "gate_reward:right"], tmp_path)
    try:
        wait_for(tmp_path / "marker", proc)  # at step 4, holding the lock, with the checkpoint of step 2
        monkeypatch.syspath_prepend(str(tmp_path))  # eval scores with the run's reward
        assert main(["eval", "--model", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == str(
            run / "checkpoints" / "step_000002"
        )
        assert main(["plot", str(run)]) == 0
        assert (run / "plots" / "summary.png").is_file()
        assert proc.poll() is None  # the run goes on
    finally:
        (tmp_path / "go").touch()
        proc.communicate(timeout=300)
    assert proc.returncode == 0
