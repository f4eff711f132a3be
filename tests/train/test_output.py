"""What ``drgrpo train`` prints while it runs: the warm start announced, plain step lines outside a terminal."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from drgrpo.train.loop import progress
from drgrpo.train.loop.progress import ProgressBar

SMALL = shlex.split(
    "--tiny-hidden-size 16 --tiny-num-layers 1 --tiny-num-heads 2 --tiny-intermediate-size 32 --task-max-operand 9 "
    "--task-num-eval 20 --task-max-work 2 --warm-start-steps 20 --warm-start-batch-size 16 --warm-start-lr 0.01 "
    "--prompts-per-step 4 --group-size 4 --max-new-tokens 5 --micro-batch-size 8 --eval-size 8 --lr 0.01"
)
"""A run of seconds: a tiny model, a 20-step warm start, 4 prompts x 4 completions a step."""

METRICS = {"step": 20, "reward": 0.625, "length_correct": 3.25, "length_incorrect": None, "kl": 0.0123,
           "tokens_per_s": 1534.0}  # fmt: skip


def test_outside_a_terminal_a_step_prints_a_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    # capsys's stdout is no terminal: every PLAIN_EVERY-th step and the last print a line, the others nothing
    bar = ProgressBar(True, total=23, start=0)
    assert bar.bar is None
    for step in (19, 20, 21, 23):
        bar.update({**METRICS, "step": step}, 0.5)
    bar.print("step 20: held-out accuracy 0.500")
    bar.close()
    line = "reward 0.62 acc 0.50 len right/wrong 3.2/- kl 0.012 1.5k tok/s"  # written out by hand
    assert capsys.readouterr().out == (f"step 20/23: {line}\nstep 23/23: {line}\nstep 20: held-out accuracy 0.500\n")


def test_disabled_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    bar = ProgressBar(False, total=10, start=0)
    bar.update({**METRICS, "step": 10}, None)
    bar.print("anything")
    assert capsys.readouterr().out == ""


def test_in_a_terminal_the_bar_redraws(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    bar = ProgressBar(True, total=30, start=0)
    try:
        assert bar.bar is not None
        bar.update({**METRICS, "step": 10}, 0.5)
        assert bar.bar.tasks[0].completed == 1 and "reward 0.62" in bar.bar.tasks[0].description
    finally:
        bar.close()
    assert "step 10/30:" not in sys.stdout.getvalue()  # the bar, not the plain line


def test_train_announces_the_warm_start_and_prints_plain_steps(tmp_path: Path) -> None:
    # the real command with its output to a pipe: the warm start says it begins and ends, each step line carries
    # the figures of metrics.jsonl (written independently, read back here) and no bar characters
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "drgrpo", "train", "--output-dir", str(run), "--steps", "2", "--eval-every", "1"]
    p = subprocess.run([*argv, *SMALL], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    # (DeepSpeed, where installed, logs its accelerator on import, as "[date] [WARNING] [real_accelerator.py...")
    lines = [ln for ln in p.stdout.splitlines() if "real_accelerator.py" not in ln]
    assert lines[0] == "warm start: training the built-in model, supervised, up to 20 steps, until train-probe " \
        "accuracy 0.25 ..."  # fmt: skip
    marker = json.loads((run / "warm_start" / "warm_start.json").read_text())
    assert lines[1].startswith(f"warm start: {marker['steps']} supervised steps in ")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    last = next(r for r in rows if r.get("step") == 2 and "reward" in r)
    expected = progress.step_text(last, evals[2])
    assert lines[2:][:4] == [
        f"step 0: held-out accuracy {evals[0]:.3f}",
        f"step 1: held-out accuracy {evals[1]:.3f}",
        f"step 2: held-out accuracy {evals[2]:.3f}",
        f"step 2/2: {expected}",
    ]
    assert f"reward {last['reward']:.2f} acc {evals[2]:.2f} " in expected
    assert lines[6].startswith("done: step 2 in ")
    assert "━" not in p.stdout and "…" not in p.stdout
