"""A full disk and damaged files: what a run says, what it keeps, and how it continues.

The full disk is injected (no small file system is available to the tests): each injection reproduces what the
writer does on a real full disk, measured on a 200 KiB tmpfs (``torch.save`` leaves a partial file and raises
``unexpected pos ...`` with no reason; Python's own files raise ``OSError(ENOSPC)``; a buffered line is written
in part). Damaged checkpoints are real files cut short or emptied.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import drgrpo.train.run.disk as disk
from drgrpo.train.cli.main import main
from drgrpo.train.run.checkpoint import checkpoints_of, find_checkpoint, read_state
from drgrpo.train.run.metrics_log import MetricsLog
from helpers.cli_runs import STEPS, TINY, assert_same_end, metrics

Usage = namedtuple("Usage", "total used free")


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- a full disk while writing a checkpoint


def torch_save_fills_the_disk(monkeypatch, free: list[int]) -> None:
    """torch.save of the second checkpoint (step 4) writes part of its file, then fails as on a full disk, where
    the disk is then full (the free space the run sees drops to 4 KiB)."""
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 500)
            free[0] = 4 * 1024
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def state_file_fills_the_disk(monkeypatch, free: list[int]) -> None:
    """trainer_state.json of the second checkpoint (step 4) meets a full disk: Python's own OSError(ENOSPC)."""
    real, calls = Path.write_text, [0]

    def write_text(self, text, *args, **kwargs):
        if self.name == "trainer_state.json":
            calls[0] += 1
            if calls[0] == 2:
                free[0] = 4 * 1024
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def too_little_room_before_writing(monkeypatch, free: list[int]) -> None:
    """Before the second checkpoint (step 4), the disk has 4 KiB left: the checkpoint is refused before a byte."""
    real, calls = disk.free_bytes, [0]

    def free_bytes(directory):
        if Path(directory).name == "checkpoints":
            calls[0] += 1
            if calls[0] == 2:  # the check before writing step 4
                free[0] = 4 * 1024
        return real(directory)

    monkeypatch.setattr("drgrpo.train.run.checkpoint.free_bytes", free_bytes)


@pytest.mark.parametrize(
    "inject", [torch_save_fills_the_disk, state_file_fills_the_disk, too_little_room_before_writing]
)
@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint(tmp_path: Path, reference: Path, monkeypatch, capsys, inject):
    free = [10 << 30]  # what the disk reports: plenty, until the injection fills it
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(20 << 30, 0, free[0]))
    inject(monkeypatch, free)
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY, "--keep-checkpoints", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line
    assert err[0].startswith(
        f"drgrpo train: error: could not write the checkpoint of step 4 to {run / 'checkpoints'}: "
        "No space left on device (4.0 KiB free; it needs about "
    ), err[0]
    assert err[0].endswith(f"; the last intact checkpoint is {run / 'checkpoints' / 'step_000002'}")
    # the failed write left nothing, and deleted nothing (--keep-checkpoints 1 never prunes before a success)
    assert [p.name for p in checkpoints_of(run / "checkpoints")] == ["step_000002"] and not leftovers(run)
    monkeypatch.undo()  # room again
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_end(run, reference)
    assert [p.name for p in checkpoints_of(run / "checkpoints")] == ["step_000006"]  # the newest 1 kept


# --------------------------------------------------------------------------- a full disk while writing metrics


@pytest.mark.slow
def test_a_full_disk_during_a_metrics_line_then_resume(tmp_path: Path, reference: Path, monkeypatch, capsys):
    real_init = MetricsLog.__init__

    class FillsUp:  # the metrics file on a disk that fills up in the middle of the line of step 5
        def __init__(self, file):
            self.file = file

        def write(self, text):
            row = json.loads(text)
            if row["step"] == 5 and "reward" in row:
                self.file.write(text[: len(text) // 2])
                self.file.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def flush(self):
            self.file.flush()

        def close(self):
            self.file.close()

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.file is not None:
            self.file = FillsUp(self.file)

    monkeypatch.setattr(MetricsLog, "__init__", init)
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *STEPS, *TINY]) == 1
    err = capsys.readouterr().err
    path = run / "metrics.jsonl"
    assert f"drgrpo train: error: could not write {path}: No space left on device" in err
    # the step itself was done: it is saved, with its metrics line
    ckpt = run / "checkpoints" / "step_000005"
    assert f"drgrpo: step 5 failed (WriteFailed); the last completed step is saved in {ckpt}" in err
    assert read_state(ckpt)["metrics"][0]["step"] == 5
    text = path.read_text()
    assert not text.endswith("\n") and len(text.splitlines()) == 5  # steps 1-4 and half of step 5

    # plot reads it, leaving out the cut line, with a warning naming the file and the last step kept
    assert main(["plot", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"drgrpo: warning: {path}: line 5 is cut off (a write that did not finish" in err
    assert "the lines kept go up to step 4" in err
    assert (run / "plots" / "summary.png").is_file()

    # resume repairs the file: the cut line out (warning), step 5's line back from its checkpoint
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{path}: line 5 is cut off" in err
    assert f"{path}: the lines of step 5 were missing; restored from {ckpt}" in err
    assert_same_end(run, reference)


def test_bad_metrics_lines_name_the_file_and_line(tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew\n{"step": 3, "reward": 0.7}\n')
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"drgrpo plot: error: {run / 'metrics.jsonl'}:2: not valid JSON (Unterminated string")
    (run / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    assert main(["plot", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}:2: expected a JSON object with an integer 'step'" in capsys.readouterr().err


# --------------------------------------------------------------------------- damaged checkpoints


def cut_weights(ckpt: Path) -> str:
    path = ckpt / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"{path} is cut off ({size // 2} of the {size} bytes its header describes)"


def empty_optimizer(ckpt: Path) -> str:
    (ckpt / "optimizer.pt").write_bytes(b"")
    return f"{ckpt / 'optimizer.pt'} is empty"


def cut_state(ckpt: Path) -> str:
    path = ckpt / "trainer_state.json"
    path.write_text(path.read_text()[:23])
    return f"{path} is cut off or damaged (not valid JSON: "


@pytest.mark.slow
@pytest.mark.parametrize("damage", [cut_weights, empty_optimizer, cut_state])
def test_a_damaged_checkpoint_names_the_file_and_the_newest_intact_one(tmp_path: Path, reference: Path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest, intact = run / "checkpoints" / "step_000006", run / "checkpoints" / "step_000004"
    problem = damage(newest)
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"drgrpo train: error: {problem}") and "\n" not in err, err
    assert err.endswith(f"; the newest intact checkpoint is {intact}")
    # drgrpo eval needs the weights and the configuration, not the optimizer state
    code = main(["eval", "--model", str(run), "--json"])
    err = capsys.readouterr().err.strip()
    if damage is empty_optimizer:
        assert code == 0, err
    else:
        assert code == 2 and err.startswith(f"drgrpo eval: error: {problem}"), err
    # the newest intact checkpoint continues the run; the damaged one is written again on the way
    assert main(["train", "--resume", str(intact), "--no-progress"]) == 0
    assert f"drgrpo: warning: {problem}" in capsys.readouterr().err
    assert_same_end(run, reference)
    assert metrics(run) == metrics(reference)
    assert find_checkpoint(run) == newest
