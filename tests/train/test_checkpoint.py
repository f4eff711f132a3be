"""Checkpoints: one way to name them, nothing unpickled, nothing half-written left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from drgrpo.train.cli.main import main
from drgrpo.train.run.checkpoint import (
    STATE_FILE,
    CheckpointError,
    clean_stale,
    find_checkpoint,
    load_optimizer_state,
    point_latest,
    resolve_model_dir,
)


def fake_checkpoint(root: Path, step: int) -> Path:
    """A small checkpoint whose files are whole: trainer state, config, weights, optimizer state."""
    ckpt = root / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
    (ckpt / "config.json").write_text("{}")
    weight = torch.nn.Parameter(torch.full((3, 2), float(step)))
    save_file({"weight": weight.detach()}, str(ckpt / "model.safetensors"))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    return ckpt


def test_every_name_of_a_run_resolves_to_its_newest_checkpoint(tmp_path: Path):
    run = tmp_path / "run"
    first, second = fake_checkpoint(run / "checkpoints", 1), fake_checkpoint(run / "checkpoints", 2)
    point_latest(run / "checkpoints", second)
    for name in (run, run / "checkpoints", run / "checkpoints" / "latest", second):
        assert find_checkpoint(name) == second, name
        assert resolve_model_dir(name) == second, name
    assert find_checkpoint(first) == first
    # a write cut between renaming step 2 into place and updating latest: latest still names step 1, and step 2,
    # complete, is the run's newest (a run's checkpoints are one history: a resume never leaves later ones behind)
    point_latest(run / "checkpoints", first)
    assert find_checkpoint(run) == second
    (run / "checkpoints" / "latest").unlink()  # without latest: the newest step
    assert find_checkpoint(run) == second
    fake_checkpoint(run / "checkpoints", 1000000)  # numbers past the six digits of the name sort as numbers
    assert find_checkpoint(run).name == "step_1000000"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_dir(hf) == hf  # a plain Hugging Face model directory is itself
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"):
        resolve_model_dir(tmp_path)


def test_a_latest_naming_anything_but_a_checkpoint_of_its_run_is_refused(tmp_path: Path):
    other = fake_checkpoint(tmp_path / "other" / "checkpoints", 5)
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 1)
    (run / "checkpoints" / "step_000009").symlink_to(other, target_is_directory=True)  # a link out of the run
    latest = run / "checkpoints" / "latest"
    for text in ("../../other/checkpoints/step_000005", str(other), "step_000009", "step_000001/.."):
        latest.write_text(text + "\n")
        with pytest.raises(CheckpointError) as info:
            find_checkpoint(run)
        message = str(info.value)
        assert message.startswith(f"{latest} names {text!r}, which is not a checkpoint of this run"), message
        assert "\n" not in message
        with pytest.raises(CheckpointError):
            resolve_model_dir(latest)


class Payload:
    """Unpickling this runs code (here: creates a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_with_a_pickled_payload_is_refused(tmp_path: Path):
    ckpt = fake_checkpoint(tmp_path, 3)
    marker = tmp_path / "payload_ran"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    state = optimizer.state_dict()
    state["state"][0] = {"momentum_buffer": Payload(marker)}
    torch.save(state, ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer.pt holds more than tensors and plain data \(refused"):
        load_optimizer_state(ckpt, torch.device("cpu"))
    assert not marker.exists()  # the payload never ran
    # a plain optimizer state loads
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    assert load_optimizer_state(ckpt, torch.device("cpu"))["param_groups"][0]["lr"] == 0.1
    torch.save({"weights": torch.ones(1)}, ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="is not an optimizer state dict"):
        load_optimizer_state(ckpt, torch.device("cpu"))


@pytest.mark.slow
def test_resume_refuses_a_pickled_payload(tmp_path: Path, capsys):
    from helpers.cli_runs import TINY

    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--steps", "1", "--eval-every", "0", *TINY]) == 0
    ckpt = run / "checkpoints" / "step_000001"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    state["state"][0]["exp_avg"] = Payload(tmp_path / "payload_ran")
    torch.save(state, ckpt / "optimizer.pt")
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 2
    assert "holds more than tensors and plain data" in capsys.readouterr().err
    assert not (tmp_path / "payload_ran").exists()


def test_clean_stale_removes_temporaries_and_restores_a_set_aside_checkpoint(tmp_path: Path):
    root = tmp_path / "checkpoints"
    kept = fake_checkpoint(root, 1)
    (root / ".tmp_step_000002_123").mkdir()
    (root / ".tmp_step_000002_123" / "model.safetensors").write_text("half")
    (root / ".latest_123").write_text("step_000002\n")
    # a replacement of step 3 cut between setting the old one aside and renaming the new one in
    aside = fake_checkpoint(root, 3).rename(root / ".old_step_000003_77")
    # and a finished replacement of step 1 whose old copy was not removed yet
    (root / ".old_step_000001_78").mkdir()
    removed = clean_stale(root)
    assert sorted(p.name for p in removed) == [".latest_123", ".old_step_000001_78", ".tmp_step_000002_123"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000003"]
    assert (root / "step_000003" / STATE_FILE).is_file() and not aside.exists() and kept.is_dir()
