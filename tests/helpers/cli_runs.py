"""The tiny ``drgrpo train`` settings as flags, runs in subprocesses, and what an exact resume must leave."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drgrpo.train.cli.main import main
from drgrpo.train.run.checkpoint import find_checkpoint
from drgrpo.train.run.runlock import LOCK_FILE

TINY = [
    "--tiny-hidden-size",
    "16",
    "--tiny-num-layers",
    "1",
    "--tiny-num-heads",
    "2",
    "--tiny-intermediate-size",
    "32",
    "--task-max-operand",
    "9",
    "--task-num-eval",
    "20",
    "--task-max-work",
    "2",
    "--warm-start-steps",
    "20",
    "--warm-start-batch-size",
    "16",
    "--warm-start-lr",
    "0.01",
    "--prompts-per-step",
    "4",
    "--group-size",
    "4",
    "--max-new-tokens",
    "5",
    "--micro-batch-size",
    "8",
    "--eval-size",
    "8",
    "--lr",
    "0.01",
    "--no-progress",
]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


STEPS = ["--steps", "6", "--eval-every", "0", "--checkpoint-every", "2"]


TIMING = {"time", "step_time", "tokens_per_s"}


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


def poison_weights_at(monkeypatch, optimizer_step: int) -> None:
    """Fault injection: the RL optimizer's ``optimizer_step``-th step (1-based) leaves a NaN in a weight."""
    from drgrpo.train.train_config import TrainConfig

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


HANG = """
import os, sys, time, importlib

owner = importlib.import_module(sys.argv[1])
path = sys.argv[2].split(".")
for part in path[:-1]:
    owner = getattr(owner, part)
real = getattr(owner, path[-1])
calls, at, caller, marker, release = [0], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]


def called_from(name):
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != name:
        frame = frame.f_back
    return frame is not None


def wrapped(*args, **kwargs):
    if caller == "-" or called_from(caller):
        calls[0] += 1
        if calls[0] == at:
            open(marker, "w").close()
            while not os.path.exists(release):  # a file nobody makes: forever
                time.sleep(0.05)
    return real(*args, **kwargs)


setattr(owner, path[-1], wrapped)
from drgrpo.train.cli.main import main

sys.exit(main(sys.argv[7:]))
"""


def launch(args: list[str], tmp_path: Path, hang: tuple[str, str, int, str] | None = None) -> subprocess.Popen:
    """``drgrpo train ARGS`` in a subprocess; ``hang`` = (module, attribute, call, caller) makes that call wait for
    the file tmp_path/release after creating tmp_path/marker."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH", "")]))}
    command = [sys.executable, "-m", "drgrpo", "train", *args]
    if hang is not None:
        module, attribute, call, caller = hang
        marker, release = str(tmp_path / "marker"), str(tmp_path / "release")
        command = [sys.executable, "-c", HANG, module, attribute, str(call), caller, marker, release, "train", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} never appeared: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


def torchrun(cmd: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run a torchrun command; (exit code, stderr). In its own session: on a timeout (a hang) the whole process
    group, torchrun and its workers, is killed, no orphans, and the timeout propagates."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, err


def tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` and the hash of its bytes, but the lock's note of its last holder."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def error_line(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run ``drgrpo ARGV`` expecting a configuration error: exit 2 and one line on stderr, which is returned."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"drgrpo {argv[0]}: error: "), err
    return lines[0]
