"""Exit codes of ``drgrpo train`` as docs/faults.md and the README state them: one test per row of the table.

2: a configuration error, one line, before any work (no warm start, nothing written but an existing output
directory); 1: a step failed, after the last completed step was saved (never non-finite weights). Exit 0 and
130 are tested in test_cli.py (test_cli_smoke_train_eval_plot, test_sigterm_saves_a_checkpoint_and_resume_continues).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drgrpo.train.cli.main import main
from drgrpo.train.run.checkpoint import find_checkpoint, read_state
from helpers.cli_runs import ENV, TINY, error_line, poison_weights_at
from helpers.tiny_configs import tiny

QUICK = ["--steps", "4", "--eval-every", "0", "--checkpoint-every", "1"]


def refused(capsys: pytest.CaptureFixture, out: Path, *args: str) -> str:
    """``drgrpo train`` with the tiny settings refused before any work: returns the error line."""
    line = error_line(capsys, "train", "--output-dir", str(out), *TINY, *args)
    assert not (out / "warm_start").exists() and not (out / "metrics.jsonl").exists()  # before any work
    return line


# --------------------------------------------------------------------------- 2: configuration errors


def test_output_directory_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.write_text("notes\n")
    line = refused(capsys, out, "--steps", "1")
    assert f"--output-dir '{out}' is a file; expected a directory" in line
    assert out.read_text() == "notes\n"  # left as it was


@pytest.mark.slow
def test_output_directory_is_a_file_in_a_real_process(tmp_path: Path) -> None:
    # the same row through `python -m drgrpo`: the process's exit code, one line, no traceback
    out = tmp_path / "out"
    out.write_text("")
    p = subprocess.run(
        [sys.executable, "-m", "drgrpo", "train", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"drgrpo train: error: --output-dir '{out}' is a file; expected a directory (created if missing)"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory (chmod does not stop it)")
def test_read_only_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = refused(capsys, parent / "run", "--steps", "1")
    finally:
        parent.chmod(0o755)
    assert f"--output-dir '{parent / 'run'}' cannot be written (Permission denied)" in line


def test_read_only_file_system_output_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # runs as root too: the file system refuses the output directory (EROFS injected where it is created)
    out = tmp_path / "ro" / "run"
    real = pathlib.Path.mkdir

    def read_only(self: Path, *args, **kwargs) -> None:
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    line = refused(capsys, out, "--steps", "1")
    assert f"--output-dir '{out}' cannot be written (Read-only file system)" in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = refused(capsys, tmp_path / "out", "--device", "cuda")
    assert "--device cuda: CUDA is not available" in line and "use --device cpu" in line
    assert not (tmp_path / "out").exists()


def test_device_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = refused(capsys, tmp_path / "out", "--device", "gpu0")
    assert "--device 'gpu0' is not a torch device" in line


def test_tensorboard_without_its_package(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    line = refused(capsys, tmp_path / "out", "--tensorboard")
    assert "--tensorboard needs the tensorboard package (pip install tensorboard)" in line


def test_reward_weights_nan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = refused(capsys, tmp_path / "out", "--reward-weights", "nan")
    assert line.endswith("--reward-weights must be a finite number, got nan")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--warm-start-lr", "--temperature", "--top-p"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_before_the_warm_start(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str
) -> None:
    line = refused(capsys, tmp_path / "out", flag, value)
    assert line.endswith(f"{flag} must be a finite number, got {value}")
    assert not (tmp_path / "out").exists()  # the warm start would have made out/warm_start


def test_eval_size_zero_with_evaluation_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = refused(capsys, tmp_path / "out", "--eval-size", "0", "--eval-every", "5")
    assert "--eval-size 0 with --eval-every 5 would evaluate no prompt" in line
    assert line.endswith("to turn evaluation off, set --eval-every 0")


@pytest.mark.parametrize(("value", "shown"), [("-1", "-1.0"), ("nan", "nan"), ("inf", "inf")])
def test_grad_clip_negative_or_not_finite(tmp_path: Path, capsys: pytest.CaptureFixture, value: str, shown: str):
    line = refused(capsys, tmp_path / "out", "--grad-clip", value)
    assert "--grad-clip must be" in line and line.endswith(f"got {shown}")
    if value == "-1":
        assert "(0 turns clipping off)" in line


@pytest.mark.parametrize(("value", "shown"), [("nan", "nan"), ("-0.5", "-0.5")])
def test_eval_temperature_nan_or_negative(tmp_path: Path, capsys: pytest.CaptureFixture, value: str, shown: str):
    line = refused(capsys, tmp_path / "out", "--eval-temperature", value)
    assert "--eval-temperature must be" in line and line.endswith(f"got {shown}")


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--keep-checkpoints", "-1", "--keep-checkpoints must be >= 0 (0: keep all), got -1"),
        ("--reward-timeout", "-1", "--reward-timeout must be a number of seconds >= 0 (0: no limit), got -1.0"),
        ("--reward-timeout", "nan", "--reward-timeout must be a finite number, got nan"),
    ],
)
def test_keep_checkpoints_and_reward_timeout_refuse_bad_values(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str, expected: str
) -> None:
    assert refused(capsys, tmp_path / "out", flag, value).endswith(expected)


def test_dtype_float16(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = refused(capsys, tmp_path / "out", "--dtype", "float16")
    assert "--dtype float16 cannot train" in line and "use --dtype bfloat16" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 1: a failed step

BAD_AT_STEP_3 = """
import math
from drgrpo.train.loop.task import exact_match

CALLS = [0]


def reward(completion, example):
    CALLS[0] += 1
    if CALLS[0] == 2 * 16 + 6:  # 16 completions a step: the 6th of step 3 (row 5 of its batch)
        return VALUE
    return exact_match(completion, example)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'yes'", "returned 'yes' (str), expected a float,"),
        ("None", "returned None (NoneType), expected a float,"),
        ("math.nan", "returned nan (not finite)"),
        ("10 ** 400", "returned 100000000000000000...0000000000000000000 (int), too large for a float,"),
        ("1e39", "returned 1e+39, beyond 1.7e+38, the largest reward whose advantages the loss's dtype holds"),
    ],
)
def test_a_bad_reward_value_at_step_3(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    name = f"bad_reward_{abs(hash(value))}"
    (tmp_path / f"{name}.py").write_text(BAD_AT_STEP_3.replace("VALUE", value))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    code = main(["train", "--output-dir", str(run), *TINY, *QUICK, "--reward", f"{name}:reward"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"drgrpo train: error: RewardError: reward {name}:reward {message}" in err
    assert "completion 5 of the batch" in err  # which completion, and on which example
    assert "on example #" in err
    assert "step 3 failed (RewardError); the last completed step is saved in" in err
    ckpt = find_checkpoint(run)
    assert ckpt.name == "step_000002" and read_state(ckpt)["step"] == 2
    assert load_file(str(ckpt / "model.safetensors"))  # loadable
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_non_finite_weights_after_the_optimizer_step(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first RL optimizer step leaves a NaN in a weight (fault injection): step 1 fails before anything is
    # saved (no checkpoint, no latest) and the message names the weights, --lr and --dtype
    poison_weights_at(monkeypatch, 1)
    run = tmp_path / "run"
    code = main(["train", "--output-dir", str(run), *TINY, *QUICK])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "FloatingPointError: step 1: the optimizer step made the weights non-finite (model." in err
    assert "(--lr 0.01, --dtype float32); lower --lr" in err
    assert "step 1 failed (FloatingPointError) while updating the weights (not saved)" in err
    assert "no checkpoint was written yet" in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert (run / "metrics.jsonl").read_text() == ""  # no step was completed


@pytest.mark.slow
def test_any_other_error_in_a_step_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a ValueError raised inside a step (here injected into the rollout of step 3) is not a configuration error:
    # exit 1 with its traceback, after saving the last completed step
    import drgrpo.train.loop.trainer as trainer

    real, calls = trainer.generate, []

    def fail_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("injected: a rollout that fails")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "generate", fail_at_step_3)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="injected") as info:  # python -m drgrpo: the traceback, exit code 1
        main(["train", "--output-dir", str(run), *TINY, *QUICK, "--checkpoint-every", "0"])
    assert len(calls) == 3 and type(info.value) is ValueError  # raised by the rollout of step 3, unwrapped
    assert "step 3 failed (ValueError); the last completed step is saved in" in capsys.readouterr().err
    assert read_state(find_checkpoint(run))["step"] == 2  # saved by the failure path (no scheduled checkpoint)


@pytest.mark.slow
def test_the_phase_that_raised_decides_between_a_failure_and_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the command's train (train_or_fail): an error of a step comes as StepFailed naming the step, its cause the
    # error itself, and pickles whole (a compare run sends it from its own process); an error of the set-up (a
    # model directory that does not exist) comes unwrapped, before any work
    import pickle

    import drgrpo.train.loop.trainer as trainer
    from drgrpo.train.cli.failures import StepFailed, train_or_fail

    real, calls = trainer.generate, []

    def fail_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected: a rollout that fails")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "generate", fail_at_step_2)
    with pytest.raises(StepFailed) as info:
        train_or_fail(tiny(tmp_path / "run", steps=3))
    assert info.value.step == 2 and info.value.__cause__ is info.value.cause
    assert type(info.value.cause) is ValueError and str(info.value.cause) == "injected: a rollout that fails"
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.step, type(copy.cause), str(copy.cause)) == (2, ValueError, "injected: a rollout that fails")
    assert str(copy) == "step 2 failed: ValueError: injected: a rollout that fails"
    assert read_state(find_checkpoint(tmp_path / "run"))["step"] == 1  # the last completed step, saved

    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        train_or_fail(tiny(tmp_path / "run2", model=str(missing)))
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- 2: values nothing could train with


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--lr", "1e39"],
            "--lr must be at most 3.4e+37, got 1e+39: AdamW's first step size is --lr / (1 - beta1) = 10 x --lr, a "
            "number it applies in the weights' dtype, which holds at most 3.4e+38 (float32, bfloat16)",
        ),
        (["--warm-start-lr", "1e38"], "--warm-start-lr must be at most 3.4e+37, got 1e+38: AdamW's first step size"),
        (
            ["--lr", "1e30", "--weight-decay", "1e10"],
            "--lr x --weight-decay is 1e+40: AdamW multiplies the weights by 1 - --lr x --weight-decay, which float32 "
            "and bfloat16 hold only up to 3.4e+38",
        ),
        (
            ["--tiny-num-heads", "5"],
            "--tiny-num-heads 5 does not split --tiny-hidden-size 16 into heads of an even width (rotary position "
            "embeddings turn a head's dimensions in pairs); --tiny-num-heads can be 1, 2, 4 or 8",
        ),
        (["--tiny-hidden-size", "15"], "--tiny-hidden-size must be even"),
        (
            ["--task-max-operand", "1000000"],
            "--task-max-operand must be in 1..999, got 1000000: the task holds every operand pair in memory, "
            "(--task-max-operand + 1)^2 of them (1,000,000 at 999)",
        ),
        (
            ["--max-new-tokens", "100000"],
            "--max-new-tokens 100000 leaves no room for a prompt in the model's context of 64 tokens "
            "(--tiny-max-positions)",
        ),
        (
            ["--tiny-max-positions", "12", "--max-new-tokens", "9"],
            "the built-in task's prompts ('",  # 4 tokens, 'a + b =' (--task-max-operand 9)
        ),
    ],
    ids=["lr", "warm-start-lr", "weight-decay", "num-heads", "hidden-size", "max-operand", "max-new-tokens", "prompt"],
)
def test_values_nothing_could_train_with(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str):
    # each was a traceback after the warm start (the learning rates, the heads), a process killed for its memory
    # (22.5 GB for --task-max-operand 1000000), or accepted (--max-new-tokens beyond the model's positions)
    line = refused(capsys, tmp_path / "out", "--steps", "1", *args)
    assert message in line
    assert not (tmp_path / "out").exists()  # nothing written: the output directory is made after every check


@pytest.mark.slow
def test_the_prompt_and_the_budget_must_fit_the_positions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the built-in prompt 'a + b =' is 4 tokens (--task-max-operand 9: one digit per operand): 4 + 8 new tokens
    # fit 12 positions, 4 + 9 do not
    too_many = refused(capsys, tmp_path / "out", "--tiny-max-positions", "12", "--max-new-tokens", "9")
    assert too_many.endswith(
        "the prompt is 4 tokens, more than the model's context leaves for it: 12 tokens (--tiny-max-positions) "
        "minus --max-new-tokens 9 is 3; shorten the prompt or lower --max-new-tokens"
    )
    run = tmp_path / "fits"
    fits = ["--tiny-max-positions", "12", "--max-new-tokens", "8", "--steps", "1", "--eval-every", "0"]
    assert main(["train", "--output-dir", str(run), *TINY, *fits]) == 0
    assert read_state(find_checkpoint(run))["step"] == 1


def test_an_empty_output_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # --output-dir "" wrote the run into the current directory
    os.chdir(tmp_path)
    line = error_line(capsys, "train", *TINY, "--output-dir", "")
    assert line == "drgrpo train: error: --output-dir must name a directory, got ''"
    line = error_line(capsys, "compare", "--output-dir", " ")
    assert line == "drgrpo compare: error: --output-dir must name a directory, got ' '"
    assert list(tmp_path.iterdir()) == []  # nothing written here


def test_the_largest_learning_rate_is_where_adamw_overflows_float32() -> None:
    # the oracle is torch's AdamW itself: its first step from a gradient g scales the step size lr / (1 - beta1)
    # = 10 lr (a float32 number) by m / (sqrt(v) + eps) = 0.1 g / |g|, so a weight moves by lr; above LR_LIMIT torch
    # refuses the step, at 0.99 of it the step is taken and TrainConfig accepts that lr
    from drgrpo.train.train_config import LR_LIMIT, TrainConfig

    def first_step(lr: float) -> torch.Tensor:
        weight = torch.zeros(3, requires_grad=True)
        weight.grad = torch.tensor([1.0, -2.0, 0.5])
        torch.optim.AdamW([weight], lr=lr, betas=(0.9, 0.99), weight_decay=0.0).step()
        return weight.detach()

    moved = first_step(0.99 * LR_LIMIT)
    assert torch.allclose(moved, torch.tensor([-1.0, 1.0, -1.0]) * 0.99 * LR_LIMIT, rtol=1e-6)
    assert TrainConfig(lr=0.99 * LR_LIMIT).lr == 0.99 * LR_LIMIT
    with pytest.raises(RuntimeError, match="overflow"):
        first_step(1.01 * LR_LIMIT)
    with pytest.raises(ValueError, match=r"lr must be at most 3\.4e\+37"):
        TrainConfig(lr=1.01 * LR_LIMIT)


@pytest.mark.slow
def test_a_reader_that_stops_reading_loses_only_the_output(tmp_path: Path) -> None:
    # `drgrpo train ... | head`: the pipe's reader is gone before the first line (its end closed at once); the run
    # goes on to its end with its files intact and exits 0, without a BrokenPipeError traceback
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(run), *TINY, "--steps", "2", "--eval-every", "1", "--progress"]
    p = subprocess.Popen(
        [sys.executable, "-m", "drgrpo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    assert p.stdout is not None
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert read_state(find_checkpoint(run))["step"] == 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], "reward" in x) for x in lines] == [(0, False), (1, True), (1, False), (2, True), (2, False)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--sampling-correction", "token_truncate", "--sampling-clip-max", "2"],
            "--sampling-correction 'token_truncate' needs a separate sampler's log-probs",
        ),
        (["--top-entropy-quantile", "0.5"], "--top-entropy-quantile 0.5 needs per-token entropies"),
        (["--entropy-coef", "0.01"], "--entropy-coef 0.01 needs per-token entropies"),
    ],
    ids=["sampling-correction", "entropy-mask", "entropy-bonus"],
)
def test_loss_options_whose_inputs_the_trainer_does_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    # the loss flags mirror every LossConfig field; these three read inputs (a sampler's log-probs, entropies) that
    # drgrpo train does not make: refused before any work instead of an error at the first loss call
    line = refused(capsys, tmp_path / "out", "--steps", "1", *args)
    assert message in line
    assert not (tmp_path / "out").exists()
