"""A run's files belong to that run: its id in every checkpoint, another run's checkpoint refused (through ``latest``,
a link or a copy), a metrics.jsonl or config.yaml it did not write never replaced, an edit of config.yaml never
overwritten, another number of processes refused on resume, non-finite weights refused at load.

Each refusal is provoked as a user would (the files a kill, a copy, a link or an editor leaves), then checked: the
exit code, the one-line message, and every file of every run involved byte for byte as before.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml

from drgrpo.train.cli.main import main
from drgrpo.train.run.checkpoint import read_state
from drgrpo.train.run.identity import config_run_id
from drgrpo.train.run.resume import config_changes
from drgrpo.train.train_config import TrainConfig
from helpers.cli_runs import TINY, tree

SHORT = ["--steps", "2", "--eval-every", "0", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run with the reference run's flags: another run than ``reference``, with another id. Copy it."""
    run = tmp_path_factory.mktemp("short") / "run"
    assert main(["train", "--output-dir", str(run), *SHORT, *TINY]) == 0
    return run


def one_line_error(capsys: pytest.CaptureFixture[str], command: str = "train") -> str:
    """The command's error: exactly one line on stderr, after the 'drgrpo COMMAND: error: ' prefix."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"drgrpo {command}: error: "), lines[0]
    return lines[0].removeprefix(f"drgrpo {command}: error: ")


def copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name, symlinks=True))


def state_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


# --------------------------------------------------------------------------- identity


@pytest.mark.slow
def test_a_run_id_is_kept_by_resumes_and_a_branch_records_its_parent(tmp_path: Path, short: Path):
    run = copy(short, tmp_path)
    first = state_of(run / "checkpoints" / "step_000002")
    run_id = first["run_id"]
    assert len(run_id) == 16 and int(run_id, 16) >= 0 and first["parent_run"] is None
    assert config_run_id(run) == run_id  # config.yaml's run line names it
    assert main(["train", "--resume", str(run), "--steps", "3", "--checkpoint-every", "1"]) == 0
    resumed = state_of(run / "checkpoints" / "step_000003")
    assert resumed["run_id"] == run_id and resumed["parent_run"] is None and config_run_id(run) == run_id

    branch = tmp_path / "branch"
    source = run / "checkpoints" / "step_000002"
    assert main(["train", "--resume", str(source), "--output-dir", str(branch), "--steps", "3"]) == 0
    child = state_of(branch / "checkpoints" / "step_000003")
    assert child["run_id"] not in (run_id, None) and config_run_id(branch) == child["run_id"]
    assert child["parent_run"] == {"run_id": run_id, "step": 2, "checkpoint": str(source.resolve())}


def test_two_new_runs_get_two_ids_each_on_all_its_checkpoints(short: Path, reference: Path):
    ids = {read_state(reference / "checkpoints" / f"step_{s:06d}")["run_id"] for s in (2, 4, 6)}
    assert ids == {config_run_id(reference)}
    assert read_state(short / "checkpoints" / "step_000002")["run_id"] not in ids


@pytest.mark.slow
def test_a_latest_linked_to_another_runs_checkpoint_is_refused(tmp_path: Path, short: Path, reference: Path, capsys):
    run, other = copy(short, tmp_path), copy(reference, tmp_path, "other")
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to(other / "checkpoints" / "step_000004", target_is_directory=True)
    before, before_other = tree(run), tree(other)
    ours, theirs = config_run_id(run), config_run_id(other)
    real = (other / "checkpoints" / "step_000004").resolve()
    expected = (
        f"{latest} leads to {real}, a checkpoint of another run ({theirs}), not of the run in {run} ({ours}): "
        "refused, so that no run is continued or scored with another run's weights."
    )

    assert main(["train", "--resume", str(latest), "--steps", "6"]) == 2
    message = one_line_error(capsys)
    assert message.startswith(expected), message
    assert message.endswith(f"name it as a branch's source: --resume {real} --output-dir NEW_DIR")
    assert main(["train", "--resume", str(latest), "--output-dir", str(tmp_path / "b"), "--steps", "6"]) == 2
    assert one_line_error(capsys).startswith(expected)  # reached through latest: not named as a branch's source
    assert main(["eval", "--model", str(latest)]) == 2
    assert one_line_error(capsys, "eval") == f"{expected} To use that checkpoint, name it: {real}"
    assert tree(run) == before and tree(other) == before_other
    assert not (tmp_path / "b").exists()

    # a step_* linked in is refused alike; named as a branch's source, the checkpoint (where it is) is accepted
    linked = run / "checkpoints" / "step_000009"
    linked.symlink_to(other / "checkpoints" / "step_000004", target_is_directory=True)
    assert main(["train", "--resume", str(linked)]) == 2
    assert one_line_error(capsys).startswith(f"{linked} leads to {real}, a checkpoint of another run ({theirs})")
    branch = tmp_path / "branch"
    assert main(["train", "--resume", str(linked), "--output-dir", str(branch), "--steps", "5"]) == 0
    assert state_of(branch / "checkpoints" / "step_000005")["parent_run"]["run_id"] == theirs
    assert tree(other) == before_other


@pytest.mark.slow
def test_a_checkpoint_copied_in_from_another_run_is_refused(tmp_path: Path, short: Path, reference: Path, capsys):
    run, other = copy(short, tmp_path), copy(reference, tmp_path, "other")
    copied = run / "checkpoints" / "step_000004"
    shutil.copytree(other / "checkpoints" / "step_000004", copied)  # newer than the run's own step 2
    before, before_other = tree(run), tree(other)
    ours, theirs = config_run_id(run), config_run_id(other)
    expected = (
        f"{copied} is a checkpoint of run {theirs}, not of run {ours}, the run in {run} (its config.yaml): refused, "
        "so that no run is continued or scored with another run's weights."
    )
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 2
    assert one_line_error(capsys).startswith(expected)
    assert main(["train", "--resume", str(copied), "--steps", "6"]) == 2  # named, but continued in place
    assert one_line_error(capsys).startswith(expected)
    assert main(["eval", "--model", str(run)]) == 2
    assert one_line_error(capsys, "eval").startswith(expected)
    (run / "config.yaml").unlink()  # without config.yaml, the run's other checkpoints say whose it is
    assert main(["eval", "--model", str(run / "checkpoints" / "latest")]) == 2
    assert f"not of run {ours}, the run in {run} (step_000002)" in one_line_error(capsys, "eval")
    before.pop("config.yaml")
    assert tree(run) == before and tree(other) == before_other


@pytest.mark.slow
def test_a_checkpoint_without_a_run_id_is_taken_as_the_runs_with_a_note(tmp_path: Path, short: Path, capsys):
    run = copy(short, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    state = state_of(ckpt)
    for key in ("run_id", "parent_run", "run_dir"):  # as drgrpo wrote checkpoints before run ids
        state.pop(key)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    config = run / "config.yaml"
    config.write_text("".join(x for x in config.read_text().splitlines(keepends=True) if not x.startswith("# run ")))
    assert config_run_id(run) is None
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0
    notes = [x for x in capsys.readouterr().err.splitlines() if "records no run id" in x]
    assert len(notes) == 1
    new_id = state_of(run / "checkpoints" / "step_000003")["run_id"]
    assert notes[0] == (
        f"drgrpo: warning: {ckpt} records no run id (written before drgrpo recorded one): it is taken to be a "
        f"checkpoint of the run in {run.resolve()}, which is run {new_id} from now on"
    )
    assert config_run_id(run) == new_id


# --------------------------------------------------------------------------- files a new run did not write


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_keeps_its_metrics(tmp_path: Path, short: Path, capsys):
    run = copy(short, tmp_path)
    shutil.rmtree(run / "checkpoints")  # what a run killed before its first checkpoint leaves
    before = tree(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert main(["train", "--output-dir", str(run), *SHORT, *TINY]) == 2  # the same command again
    path = run / "metrics.jsonl"
    assert one_line_error(capsys) == (
        f"{path} holds 2 lines (steps 1 to 2) of a run that left no checkpoint, so there is nothing to --resume, "
        f"and a new run would replace them: start it in another --output-dir, or move or delete {path} first"
    )
    assert tree(run) == before
    # a branch into it is refused alike
    source = short / "checkpoints" / "step_000002"
    assert main(["train", "--resume", str(source), "--output-dir", str(run), "--steps", "3"]) == 2
    assert "of a run that left no checkpoint, so there is nothing to --resume, and a branch would replace them" in (
        one_line_error(capsys)
    )
    assert tree(run) == before


def test_a_config_yaml_a_person_wrote_is_never_overwritten(tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    text = "# my notes\nlr: 0.001\nsteps: 50\n"
    (run / "config.yaml").write_text(text)
    assert main(["train", "--output-dir", str(run), *SHORT, *TINY]) == 2
    assert one_line_error(capsys) == (
        f"{run / 'config.yaml'} was not written by drgrpo, or was edited since, and this run would overwrite it with "
        "its own: start the run in another --output-dir, or move or delete the file first (to run with its flags, "
        f"--config {run / 'config.yaml'} --output-dir NEW_DIR)"
    )
    assert (run / "config.yaml").read_text() == text
    assert not (run / "metrics.jsonl").exists() and not (run / "warm_start").exists()  # before any work


def test_a_config_yaml_of_a_run_that_left_nothing_else_is_replaced(tmp_path: Path):
    from drgrpo.train.run.resume import check_run_dir, plan_run

    # a run stopped in its warm start leaves its config.yaml (drgrpo's own, unedited) and an empty metrics.jsonl:
    # nothing of a run is lost when a new one replaces them
    run = tmp_path / "run"
    run.mkdir()
    from drgrpo.train.run.identity import write_config

    earlier = TrainConfig(output_dir=str(run), lr=0.002)
    write_config(run, earlier, "0123456789abcdef", [])
    (run / "metrics.jsonl").write_text("")
    config = TrainConfig(output_dir=str(run))
    check_run_dir(run, plan_run(config), config=config)  # accepted
    # stopped in its first step: only the evaluation of the initial model (step 0), which the new run makes again
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.25}) + "\n")
    check_run_dir(run, plan_run(config), config=config)  # accepted
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.25}) + '\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl holds 2 lines \(steps 0 to 1\) of a run that left no"):
        check_run_dir(run, plan_run(config), config=config)  # a completed step: kept
    (run / "metrics.jsonl").write_text("")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lr: 0.002", "lr: 0.003"))
    with pytest.raises(ValueError, match="was not written by drgrpo, or was edited since"):
        check_run_dir(run, plan_run(config), config=config)  # edited: kept


# --------------------------------------------------------------------------- resume: config.yaml, --model


@pytest.mark.slow
def test_an_edit_of_config_yaml_is_never_overwritten_by_a_resume(tmp_path: Path, short: Path, capsys):
    run = copy(short, tmp_path)
    path = run / "config.yaml"
    edited = path.read_text().replace("\nsteps: 2\n", "\nsteps: 3\n").replace(str(short), str(run))  # (a copy)
    path.write_text(edited)
    before = tree(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert one_line_error(capsys) == (
        f"{path} was edited since the run wrote it (steps: 3 in the file, 2 in the checkpoint): --resume takes the "
        "run's flags from its checkpoint and the command line, and would overwrite the file. To continue with the "
        f"file's flags add --config {path} (flags that change what the run computes need a branch); to continue as "
        "the run was, undo the edit or delete the file (the run writes it again)"
    )
    assert tree(run) == before
    # with the file's flags, the resume runs them: the edit is what the run does now, recorded in its history
    assert main(["train", "--resume", str(run), "--config", str(path)]) == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    (entry,) = state_of(run / "checkpoints" / "step_000003")["history"]
    assert entry["changed"] == {"steps": [2, 3]}
    assert yaml.safe_load(path.read_text())["steps"] == 3 and config_run_id(run) is not None


def test_resume_with_the_model_directory_written_relatively_or_absolutely_is_no_change(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models", target_is_directory=True)
    saved = TrainConfig(model="models/m")
    for same in (str(tmp_path / "models" / "m"), "./models/m/", "link/m", "models/../models/m"):
        assert config_changes(saved, saved.replace(model=same)) == [], same
    (change,) = config_changes(saved, saved.replace(model="models/other"))
    assert (change.flag, change.kind, change.old, change.new) == ("model", "checkpoint", "models/m", "models/other")


# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_a_resume_on_another_number_of_processes_is_refused(tmp_path: Path, short: Path, capsys):
    run = copy(short, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    state = state_of(ckpt)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as a checkpoint of a 2-process run (a rank was killed; resumed without torchrun)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    before = tree(run)
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 2
    assert one_line_error(capsys) == (
        f"--resume {ckpt}: the run ran on 2 processes, this resume on 1. Every step samples from (seed, step, "
        "process rank), so another number of processes draws other completions than the uninterrupted run would: "
        f"resume it on 2 (torchrun --nproc-per-node 2, or no torchrun for 1), or start a branch on 1: --resume {ckpt} "
        "--output-dir NEW_DIR"
    )
    assert tree(run) == before
    branch = tmp_path / "branch"
    assert main(["train", "--resume", str(ckpt), "--output-dir", str(branch), "--steps", "3"]) == 0
    (entry,) = state_of(branch / "checkpoints" / "step_000003")["history"]
    assert entry["processes"] == [2, 1] and entry["branch"] is True
    assert "): --steps 2 -> 3, processes 2 -> 1\n" in (branch / "config.yaml").read_text()


@pytest.mark.slow
def test_a_resume_under_torchrun_on_more_processes_is_refused(tmp_path: Path, short: Path):
    from helpers.cli_runs import torchrun

    run = copy(short, tmp_path)
    before = tree(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "drgrpo",
           "train", "--resume", str(run), "--steps", "3"]  # fmt: skip
    returncode, err = torchrun(cmd, env)
    assert returncode != 0
    assert f"--resume {run / 'checkpoints' / 'step_000002'}: the run ran on 1 processes, this resume on 2." in err
    assert tree(run) == before


# --------------------------------------------------------------------------- non-finite weights


def poison(weights: Path) -> str:
    """Write a NaN over the first number of the first tensor of a safetensors file, in place (its header and size
    unchanged, as a bit flip or a bad copy leaves it); returns the tensor's name."""
    with weights.open("r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        name, entry = min(
            ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
        )
        assert entry["dtype"] == "F32"
        f.seek(8 + header_len + entry["data_offsets"][0])
        f.write(struct.pack("<f", math.nan))
    return name


@pytest.mark.slow
def test_non_finite_weights_are_refused_at_load(tmp_path: Path, short: Path, capsys):
    run = copy(short, tmp_path)
    weights = run / "checkpoints" / "step_000002" / "model.safetensors"
    name = poison(weights)
    before = tree(run)
    expected = (
        f"{weights} holds non-finite weights (NaN or infinity in {name}): refused, since training or evaluating it "
        "gives no meaningful result. drgrpo never saves such weights: use an earlier checkpoint of the run, or the "
        "model as it was made"
    )
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 2
    assert one_line_error(capsys) == expected
    assert main(["eval", "--model", str(run)]) == 2
    assert one_line_error(capsys, "eval") == expected
    new = tmp_path / "new"
    assert main(["train", "--model", str(weights.parent), "--output-dir", str(new), *SHORT, *TINY]) == 2
    assert one_line_error(capsys) == expected
    assert tree(run) == before
    assert not new.exists()  # refused before anything is written
