"""Signals always win: SIGTERM and Ctrl-C end a run within seconds, whatever it is doing, and lose no completed step.

The scenarios hang the run at one moment (a reward that sleeps or loops forever, a rollout, the warm start, the
policy update, the optimizer step), signal it, check the exit code, the time it took and the checkpoint left, then
resume it and compare the end with the uninterrupted run (the ``reference`` fixture), bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drgrpo.train.cli.main import main
from drgrpo.train.loop.data import RewardError, call_reward
from drgrpo.train.run.checkpoint import checkpoints_of, find_checkpoint, read_state
from drgrpo.train.run.stopping import Interrupted, StopOnSignal
from helpers.cli_runs import STEPS, TINY, assert_same_end, launch, wait_for

SIGNAL_TO_EXIT = 30.0
"""Seconds a stopped run may take to end (about 1 s on a quiet 2-core machine; margin for a loaded one)."""


# --------------------------------------------------------------------------- the signal handler itself


def test_what_a_signal_does_in_each_kind_of_section():
    with StopOnSignal() as stop:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)  # the optimizer step, a checkpoint write: never cut
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.stopped and stop.signum == signal.SIGINT
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # elsewhere, the first signal: finish the step, then stop
        assert stop.stopped
        with pytest.raises(Interrupted, match="stopped by SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
        with pytest.raises(Interrupted, match="stopped by SIGINT"), stop.abandonable():
            pass  # no abandonable work starts after a signal
    with StopOnSignal() as stop, pytest.raises(Interrupted, match="stopped by SIGTERM"), stop.abandonable():
        os.kill(os.getpid(), signal.SIGTERM)  # a rollout, a reward: abandoned at once
        time.sleep(60)  # never reached: the signal interrupts the sleep
    with StopOnSignal() as stop, pytest.raises(Interrupted, match="stopped by SIGINT"), stop.abandonable():
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        while True:  # a reward looping forever in Python
            pass
    with StopOnSignal(escalate=False) as stop:  # several processes: a second signal is like the first
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def slow(seconds: float):
    def reward(completion: str, example: dict) -> float:
        time.sleep(seconds)
        return 1.0

    return reward


def busy(completion: str, example: dict) -> float:
    while True:
        pass


@pytest.mark.parametrize("fn", [slow(600), busy], ids=["sleeping", "looping"])
def test_a_reward_past_its_time_limit_is_abandoned(fn):
    with StopOnSignal(reward_timeout=0.3) as stop:
        started = time.monotonic()
        with pytest.raises(RewardError) as info:
            call_reward("mod:slow", fn, "4 2", {"prompt": "3 7 + 0 5 ="}, 7, watchdog=stop.watchdog)
        took = time.monotonic() - started
        assert 0.3 <= took < 5, took
        assert str(info.value) == (
            'reward mod:slow ran longer than --reward-timeout 0.3 s on example #7 {"prompt": "3 7 + 0 5 ="} '
            "with completion '4 2'; the call was abandoned"
        )
        # calls within the limit are untouched, and no late signal of the abandoned call reaches them
        assert [call_reward("mod:quick", slow(0.1), "x", {}, watchdog=stop.watchdog) for _ in range(5)] == [1.0] * 5


# --------------------------------------------------------------------------- a whole run, hung and signalled

HANG_REWARD = """
import os, time
from drgrpo.train.loop.task import exact_match

CALLS = 0


def right(completion, example):
    global CALLS
    CALLS += 1
    if CALLS == 3 * 16 + 1 and not os.path.exists(MARKER):  # the first call of step 4 (16 a step), once
        open(MARKER, "w").close()
        while True:
            HANG
    return exact_match(completion, example)
"""


def signal_and_wait(proc: subprocess.Popen, *signals: int, pause: float = 1.0) -> tuple[int, str, float]:
    """Send ``signals`` (``pause`` s apart); (exit code, stderr, seconds from the last signal to the exit)."""
    for k, sig in enumerate(signals):
        if k:
            time.sleep(pause)
            assert proc.poll() is None, "the first signal alone ended a run that had a step to finish"
        proc.send_signal(sig)
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=SIGNAL_TO_EXIT + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err, time.monotonic() - sent


def run_args(run: Path) -> list[str]:
    return ["--output-dir", str(run), *STEPS, *TINY]


@pytest.mark.slow
def test_a_signal_ends_a_run_whose_reward_hangs(tmp_path: Path, reference: Path, monkeypatch):
    (tmp_path / "hang_reward.py").write_text(
        HANG_REWARD.replace("MARKER", repr(str(tmp_path / "marker"))).replace("HANG", "time.sleep(1)")
    )
    run = tmp_path / "run"
    proc = launch([*run_args(run), "--reward", "hang_reward:right"], tmp_path)
    wait_for(tmp_path / "marker", proc)
    code, err, seconds = signal_and_wait(proc, signal.SIGTERM)
    assert code == 130, err[-3000:]
    assert seconds < SIGNAL_TO_EXIT, seconds
    ckpt = run / "checkpoints" / "step_000003"  # checkpoints come every 2 steps: step 3 was saved by the stop
    assert "stopped by SIGTERM during step 4 (abandoned: a resume does it again); the last completed step is " \
        f"saved in {ckpt}" in err  # fmt: skip
    assert find_checkpoint(run) == ckpt and read_state(ckpt)["step"] == 3
    monkeypatch.syspath_prepend(str(tmp_path))  # the reward no longer hangs (its marker is there)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_end(run, reference)


HUNG_STEP = {
    # the rollout of step 4 never ends: SIGTERM abandons it at once
    "rollout": (("drgrpo.train.loop.trainer", "generate", 4, "-"), (signal.SIGTERM,)),
    # the update of step 4 hangs before its optimizer step: the first Ctrl-C waits for the step to end (it never
    # does), the second ends the run at once
    "policy update": (("torch.nn.utils", "clip_grad_norm_", 4, "-"), (signal.SIGINT, signal.SIGINT)),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(HUNG_STEP))
def test_signals_end_a_hung_step_and_save_the_last_completed_one(tmp_path: Path, reference: Path, moment: str):
    hang, signals = HUNG_STEP[moment]
    run = tmp_path / "run"
    proc = launch(run_args(run), tmp_path, hang=hang)
    wait_for(tmp_path / "marker", proc)
    code, err, seconds = signal_and_wait(proc, *signals)
    assert code == 130 and seconds < SIGNAL_TO_EXIT, (code, seconds, err[-3000:])
    name = signal.Signals(signals[-1]).name
    assert f"stopped by {name} during step 4 (abandoned: a resume does it again)" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert read_state(find_checkpoint(run))["step"] == 3
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_end(run, reference)


@pytest.mark.slow
def test_a_signal_ends_the_warm_start(tmp_path: Path):
    run = tmp_path / "run"  # the warm start measures its probe every 10 supervised steps: the first one hangs
    proc = launch(run_args(run), tmp_path, hang=("drgrpo.train.loop.warmstart", "probe_accuracy", 1, "-"))
    wait_for(tmp_path / "marker", proc)
    code, err, seconds = signal_and_wait(proc, signal.SIGTERM)
    assert code == 130 and seconds < SIGNAL_TO_EXIT, (code, seconds, err[-3000:])
    assert "drgrpo: stopped by SIGTERM before the first step; nothing to save" in err
    assert not (run / "warm_start" / "warm_start.json").exists()  # never taken for a finished warm start
    assert not checkpoints_of(run / "checkpoints")


@pytest.mark.slow
def test_ctrl_c_waits_for_the_optimizer_step_then_saves_it(tmp_path: Path, reference: Path):
    # two Ctrl-C while the optimizer changes the weights of step 4: nothing is cut; once the optimizer step is
    # done, the run logs step 4, saves it and stops
    run = tmp_path / "run"
    proc = launch(run_args(run), tmp_path, hang=("torch.optim", "AdamW.step", 4, "policy_update"))
    wait_for(tmp_path / "marker", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # still in the optimizer step
    (tmp_path / "release").touch()
    code, err, seconds = signal_and_wait(proc)
    assert code == 130 and seconds < SIGNAL_TO_EXIT, (code, seconds, err[-3000:])
    ckpt = find_checkpoint(run)
    assert read_state(ckpt)["step"] == 4 and ckpt.name == "step_000004"
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_end(run, reference)


@pytest.mark.slow
def test_a_reward_past_the_time_limit_fails_the_step(tmp_path: Path, reference: Path, monkeypatch, capsys):
    # in this process: the watchdog's SIGINT reaches the main thread here as in the command's own process
    (tmp_path / "slow_reward.py").write_text(
        HANG_REWARD.replace("MARKER", repr(str(tmp_path / "marker"))).replace("HANG", "time.sleep(1)")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    code = main(["train", *run_args(run), "--reward", "slow_reward:right", "--reward-timeout", "2"])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert (tmp_path / "marker").exists()  # the hanging call was made, and abandoned
    assert "drgrpo train: error: RewardError: reward slow_reward:right ran longer than --reward-timeout 2 s on " \
        "example #" in err  # fmt: skip
    assert "the call was abandoned" in err and "Traceback" not in err
    assert "step 4 failed (RewardError); the last completed step is saved in" in err
    assert read_state(find_checkpoint(run))["step"] == 3
    # with the same limit (saved with the run); no hang any more (the marker is there)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_end(run, reference)


TORCHRUN_HANG = """
import os, time
from drgrpo.train.loop.task import exact_match

CALLS = 0


def right(completion, example):
    global CALLS
    CALLS += 1
    if CALLS == 2 * 8 + 1:  # this process's first call of step 3 (8 completions a step on each of 2)
        open(os.path.join(DIR, "marker_" + os.environ["RANK"]), "w").close()
        while True:
            time.sleep(1)
    return exact_match(completion, example)
"""


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_process_at_the_same_step(tmp_path: Path):
    # Ctrl-C in a terminal signals the whole process group (torchrun and its processes), and torchrun passes it
    # on: each process gets SIGINT twice. Both rewards hang in step 3; both processes must stop, none waiting for
    # the other, with step 2 saved once.
    (tmp_path / "hang_everywhere.py").write_text(TORCHRUN_HANG.replace("DIR", repr(str(tmp_path))))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "drgrpo",
           "train", "--output-dir", str(run), "--steps", "4", "--eval-every", "0", "--checkpoint-every", "0", *TINY,
           "--reward", "hang_everywhere:right"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        for rank in (0, 1):
            wait_for(tmp_path / f"marker_{rank}", proc)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=SIGNAL_TO_EXIT + 60)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert seconds < SIGNAL_TO_EXIT, (seconds, err[-3000:])
    ckpt = run / "checkpoints" / "step_000002"
    assert f"stopped by SIGINT during step 3 (abandoned: a resume does it again); the last completed step is saved " \
        f"in {ckpt}" in err  # fmt: skip
    assert "stopped by SIGINT during step 3 (abandoned: a resume does it again); process 0 saves the last completed " \
        "step (2)" in err  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]
    state = read_state(ckpt)
    assert state["step"] == 2 and state["world_size"] == 2
