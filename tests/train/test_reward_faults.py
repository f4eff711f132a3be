"""A reward cannot take the run down: whatever the user's reward does to the process, the run fails the step with
exit code 1, one line naming the reward, the step and what it did, and the last completed step saved where
``--output-dir`` said.

Each case provokes it in a tiny run (16 completions a step, so call 19 is completion 2 of step 2's batch) and
checks the exit code, the message, the checkpoint of step 1 and the metrics lines; the process is checked too
(working directory, signal handlers, no forked child left training).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drgrpo.train import TrainConfig
from drgrpo.train.cli.main import main
from drgrpo.train.loop.rewards import FORKED_CHILD_EXIT, RewardError, Rewards, call_reward
from drgrpo.train.loop.task import exact_match
from drgrpo.train.run.checkpoint import find_checkpoint, read_state
from drgrpo.train.run.stopping import StopOnSignal
from helpers.cli_runs import ENV, TINY

RUN = ["--steps", "3", "--eval-every", "0", "--checkpoint-every", "0"]
"""Three steps, no scheduled checkpoint: only the failure path saves step 1."""

AT_STEP_2 = """
import os, signal, sys
from drgrpo.train.loop.task import exact_match

CALLS = [0]


def reward(completion, example):
    CALLS[0] += 1
    if CALLS[0] == 16 + 3:  # step 2 (16 completions a step), row 2 of its batch
        ACTION
    return exact_match(completion, example)
"""

CASES = {
    "sys.exit(0)": ("sys.exit(0)", "called sys.exit(0) (SystemExit) on example #"),
    "sys.exit(3)": ("sys.exit(3)", "called sys.exit(3) (SystemExit) on example #"),
    "KeyboardInterrupt": ("raise KeyboardInterrupt", "raised KeyboardInterrupt on example #"),
    "default SIGINT handler": (
        "signal.signal(signal.SIGINT, signal.default_int_handler)",
        "replaced the SIGINT handler with Python's default (KeyboardInterrupt) (signal.signal; the trainer's, which "
        "saves the run on a signal, is put back) on example #",
    ),
    "SIGTERM ignored": (
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
        "replaced the SIGTERM handler with SIG_IGN",
    ),
    "os.chdir": (
        "os.makedirs('elsewhere', exist_ok=True); os.chdir('elsewhere')",
        "changed the working directory to ",
    ),
    "os.fork": (
        "open(PIDFILE, 'a').write(f'{os.fork()}\\n')",  # the parent writes the child's pid, the child 0
        "called os.fork() (the child that came back to the trainer was ended at once;",
    ),
}


def steps_logged(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_reward_that_harms_the_process_fails_the_step_and_loses_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    action, message = CASES[case]
    name = f"harmful_{abs(hash(case))}"
    pidfile = tmp_path / "pids"
    (tmp_path / f"{name}.py").write_text(AT_STEP_2.replace("ACTION", action).replace("PIDFILE", repr(str(pidfile))))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # --output-dir is relative: a reward's os.chdir must not move the run
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    code = main(["train", "--output-dir", "run", *TINY, *RUN, "--reward", f"{name}:reward"])
    err = capsys.readouterr().err

    assert code == 1, err
    error = [line for line in err.splitlines() if line.startswith("drgrpo train: error: ")]
    assert len(error) == 1, err  # one line names the reward, what it did and the step
    assert error[0].startswith(f"drgrpo train: error: RewardError: reward {name}:reward {message}"), error[0]
    assert "with completion 2 of the batch" in error[0] and ", at step 2" in error[0]
    assert "step 2 failed (RewardError); the last completed step is saved in" in err
    # nothing lost: step 1 saved where --output-dir said, once; nothing written where the reward went
    run = tmp_path / "run"
    assert read_state(find_checkpoint(run))["step"] == 1
    assert find_checkpoint(run).parent == run / "checkpoints"
    assert steps_logged(run) == [1]
    assert not (tmp_path / "elsewhere" / "run").exists()
    # the process is as it was: working directory and handlers
    assert Path.cwd() == tmp_path
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    if case == "os.fork":  # the child came back to the trainer and ended at once, without training or logging
        pids = sorted(int(x) for x in pidfile.read_text().split())
        assert len(pids) == 2 and pids[0] == 0 < pids[1]  # the child wrote 0, the parent the child's pid
        deadline = time.monotonic() + 30
        while (status := os.waitpid(pids[1], os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.WIFEXITED(status[1]) and os.WEXITSTATUS(status[1]) == FORKED_CHILD_EXIT
        assert steps_logged(run) == [1]  # the child logged no step


def test_ctrl_c_from_outside_still_stops_a_reward_call():
    """A KeyboardInterrupt is the reward's own inside a run; outside one (Python's handler), it is Ctrl-C."""

    def interrupted(completion: str, example: dict) -> float:
        raise KeyboardInterrupt

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        call_reward("mod:f", interrupted, "x", {})
    with StopOnSignal(), pytest.raises(RewardError, match=r"^reward mod:f raised KeyboardInterrupt on example"):
        call_reward("mod:f", interrupted, "x", {})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import sys\nsys.exit(0)\n", "importing module '{name}' called sys.exit(0)"),
        ("import sys\nsys.exit('no GPU')\n", "importing module '{name}' called sys.exit('no GPU')"),
        ("def reward(c, e)\n    return 1.0\n", "module '{name}' has a syntax error: {file}, line 1: expected ':'"),
        ("raise RuntimeError('no licence')\n", "importing module '{name}' raised RuntimeError: no licence"),
    ],
    ids=["SystemExit(0)", "SystemExit(text)", "SyntaxError", "RuntimeError"],
)
def test_a_reward_module_that_fails_at_import_is_refused_before_any_work(
    source: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"bad_import_{abs(hash(source))}"
    module = tmp_path / f"{name}.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), *TINY, "--reward", f"{name}:reward"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == [
        f"drgrpo train: error: reward '{name}:reward': " + message.format(name=name, file=module)
    ]
    assert not out.exists() or not any(out.iterdir())  # before any work: nothing written


def test_each_reward_call_gets_its_own_copy_of_the_example():
    """A reward that edits its example changes neither the other calls nor the dataset (nor later steps)."""
    seen: list[dict] = []

    def editing(completion: str, example: dict) -> float:
        seen.append(json.loads(json.dumps(example)))
        value = exact_match(completion, example)
        example["answer"] = "wrong"
        example["work"]["steps"].append("edited")
        return value

    example = {"prompt": "1 + 1 =", "answer": "2", "work": {"steps": ["1 + 1"]}}
    pristine = json.loads(json.dumps(example))
    rewards = Rewards(("mod:a", "mod:b"), (editing, editing), (1.0, 1.0))
    totals, firsts = rewards(["2", "2", "3"], [example] * 3, [0, 0, 0])
    # the oracle: exact match on the untouched example, for each of the 2 rewards
    expected = [2.0 * exact_match(c, pristine) for c in ["2", "2", "3"]]
    assert totals == expected == [2.0, 2.0, 0.0] and firsts == [1.0, 1.0, 0.0]
    assert seen == [pristine] * 6  # every call saw the example as the dataset holds it
    assert example == pristine


SHIFTED = """
from drgrpo.train.loop.task import exact_match


def shifted(completion, example):
    return 1e8 + exact_match(completion, example)


def right(completion, example):
    return exact_match(completion, example)
"""


@pytest.mark.slow
def test_accuracy_is_only_the_mean_of_a_0_or_1_reward(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shift_rewards.py").write_text(SHIFTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    steps = ["--steps", "2", "--eval-every", "2", "--checkpoint-every", "0"]
    # 1e8 + correct first: no accuracy (it would read 100000000.x); its mean under its name instead
    first = tmp_path / "shifted_first"
    assert main(["train", "--output-dir", str(first), *TINY, *steps, "--reward", "shift_rewards:shifted"]) == 0
    lines = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "reward" in m]
    eval_lines = [m for m in lines if "eval/reward" in m]
    assert len(train_lines) == 2 and len(eval_lines) == 2  # steps 1, 2; evaluations at 0 and 2
    for m in train_lines:
        assert m["accuracy"] is None
        assert m["reward/shift_rewards:shifted"] == m["reward"]  # the only reward, weight 1
        assert 0 <= m["reward"] - 1e8 <= 1
    for m in eval_lines:
        assert m["eval/accuracy"] is None and m["eval/reward/shift_rewards:shifted"] == m["eval/reward"]
    # a 0/1 reward first, the shifted one second: accuracy is the share scored 1, total = 1e8 + 2 * correct
    second = tmp_path / "right_first"
    rewards = ["--reward", "shift_rewards:right", "--reward", "shift_rewards:shifted"]
    assert main(["train", "--output-dir", str(second), *TINY, *steps, *rewards]) == 0
    lines = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    for m in (m for m in lines if "reward" in m):
        assert m["accuracy"] == pytest.approx((m["reward"] - 1e8) / 2, abs=1e-7)
        assert not any(key.startswith("reward/") for key in m)
    capsys.readouterr()


def test_train_config_refuses_reward_callables_and_nan_weights() -> None:
    def my_reward(completion: str, example: dict) -> float:
        return 1.0

    with pytest.raises(TypeError, match=r"^rewards\[0\] must be a 'module:function' name, got function .*my_reward"):
        TrainConfig(rewards=[my_reward])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^rewards must be a list of 'module:function' names, got str"):
        TrainConfig(rewards="drgrpo.train.loop.task:exact_match")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^reward_weights must be a finite number, got nan$"):
        TrainConfig(reward_weights=[math.nan])  # type: ignore[arg-type]
    config = TrainConfig(rewards=["drgrpo.train.loop.task:exact_match"], reward_weights=[2])  # type: ignore[arg-type]
    assert config.rewards == ("drgrpo.train.loop.task:exact_match",) and config.reward_weights == (2.0,)


@pytest.mark.slow
def test_a_reward_that_forks_never_trains_twice_in_a_real_process(tmp_path: Path) -> None:
    """``python -m drgrpo train`` with a reward that forks at step 2: exit 1, one process trained, once."""
    (tmp_path / "forking_reward.py").write_text(
        AT_STEP_2.replace("ACTION", "open(PIDFILE, 'a').write(f'{os.fork()}\\n')").replace(
            "PIDFILE", repr(str(tmp_path / "pids"))
        )
    )
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH", "")]))}
    run = tmp_path / "run"
    argv = ["train", "--output-dir", str(run), *TINY, *RUN, "--reward", "forking_reward:reward"]
    p = subprocess.run([sys.executable, "-m", "drgrpo", *argv], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1, p.stderr[-3000:]
    error = [line for line in p.stderr.splitlines() if line.startswith("drgrpo train: error: ")]
    assert len(error) == 1 and "reward forking_reward:reward called os.fork()" in error[0] and ", at step 2" in error[0]
    assert p.stderr.count("step 2 failed (RewardError)") == 1  # the child printed nothing
    assert p.stdout.count("warm start:") <= 1  # no buffered output flushed twice
    assert read_state(find_checkpoint(run))["step"] == 1 and steps_logged(run) == [1]
    child = max(int(x) for x in (tmp_path / "pids").read_text().split())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(child):
        time.sleep(0.1)
    assert not _running(child)  # ended at once, not training on


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, ended but not yet reaped, is not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] not in ("Z", "X")
