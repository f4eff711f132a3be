"""drgrpo compare: the summary statistics against hand-computed values, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from drgrpo.train.cli.compare import (
    CompareConfig,
    load_metrics,
    mean_spread,
    moving_average,
    render_report,
    summary_rows,
    tail_mean,
)
from drgrpo.train.cli.main import main

COMPARE_MODEL = [
    "--tiny-hidden-size", "16", "--tiny-num-layers", "1", "--tiny-num-heads", "2", "--tiny-intermediate-size", "32",
]  # fmt: skip
"""The smallest built-in model the comparisons here train (what they test is not the model)."""


def test_moving_average_skips_undefined_values():
    got = moving_average([None, 1.0, 3.0, None, 5.0, 7.0], window=2)
    assert math.isnan(got[0])
    assert got[1:] == [1.0, 2.0, 2.0, 4.0, 6.0]


def test_tail_mean_and_spread_by_hand():
    values = [10.0] * 8 + [1.0, None]  # last 20% = the last two entries; None is left out
    assert tail_mean(values) == 1.0
    assert mean_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std of 1, 2, 3 is 1
    assert mean_spread([4.0]) == (4.0, 0.0)
    assert mean_spread([math.nan, 2.0, 4.0])[0] == 3.0


def _write_run(path, length_incorrect, accuracy, truncated=0.0):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/accuracy": accuracy[0]}) + "\n")
        for step, li in enumerate(length_incorrect, start=1):
            row = {"step": step, "reward": 0.5, "length_correct": 4.0, "length_incorrect": li}
            row["frac_truncated"] = truncated * step
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"step": len(length_incorrect), "eval/accuracy": accuracy[1]}) + "\n")


def test_summary_table_from_hand_written_metrics(tmp_path):
    # Two seeds of one loss: incorrect lengths ramp 4 -> 13 (seed 0) and stay at 4 (seed 1).
    _write_run(tmp_path / "s0", [4.0 + i for i in range(10)], (0.2, 0.6), truncated=0.01)
    _write_run(tmp_path / "s1", [4.0] * 10, (0.4, 0.8), truncated=0.03)
    curves = {"grpo": [load_metrics(tmp_path / "s0"), load_metrics(tmp_path / "s1")]}
    assert curves["grpo"][0].eval_steps == [0, 10]
    (row,) = summary_rows(curves)
    assert row["acc_first"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert row["acc_last"] == pytest.approx((0.7, math.sqrt(0.02)))
    # final = mean of the last 2 of 10 steps: seed 0 (12 + 13) / 2 = 12.5, seed 1 4.0
    assert row["len_incorrect"] == pytest.approx((8.25, math.sqrt(2 * 4.25**2)))
    assert row["len_correct"] == (4.0, 0.0)
    # truncated share on steps 9 and 10: seed 0 (0.09 + 0.10) / 2 = 0.095, seed 1 (0.27 + 0.30) / 2 = 0.285
    assert row["truncated"] == pytest.approx((0.19, math.sqrt(2 * 0.095**2)))
    text = render_report(
        CompareConfig(losses=("grpo",), seeds=2),
        _Base(),
        curves,
        {k: tmp_path / f"{k}.png" for k in ("all", "reward", "eval_accuracy", "length_correct", "length_incorrect")},
        60.0,
    )
    assert "| `grpo` | 0.300 ± 0.141 | 0.700 ± 0.141 |" in text
    # gap change = (incorrect - correct) final minus first: seed 0 (12.5 - 4) - (8.5 - 4) = 4, seed 1 0
    assert row["gap_change"] == pytest.approx((2.0, math.sqrt(8.0)))
    assert "| 8.25 ± 6.01 | 2.00 ± 2.83 | 0.190 ± 0.134 |" in text


class _Base:
    steps, prompts_per_step, group_size, max_new_tokens, temperature, lr = 10, 4, 8, 8, 1.0, 1e-3

    class task:
        max_work, work_position = 4, "after"

    def replace(self, **_):
        return self


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="unknown loss preset"):
        CompareConfig(losses=("grpo", "drgrpo"))
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        CompareConfig(seeds=0)


@pytest.mark.slow
def test_cli_end_to_end_tiny(tmp_path):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--output-dir",
        str(out),
        "--seeds",
        "2",
        "--steps",
        "3",
        "--prompts-per-step",
        "4",
        "--group-size",
        "4",
        "--jobs",
        "1",  # (two at a time: test_compare_from_a_local_model)
        "--warm-start-steps",
        "10",
        *COMPARE_MODEL,
    ]
    assert main(args) == 0  # (the runs are in worker processes of their own all the same)
    for loss in ("grpo", "dr_grpo"):
        for seed in (0, 1):
            run = load_metrics(out / "runs" / loss / f"seed{seed}")
            assert run.steps == [1, 2, 3]
    # the same warm start and data: step-0 held-out accuracy is identical across losses and seeds
    first = {
        load_metrics(out / "runs" / loss / f"seed{s}").eval_accuracy[0] for loss in ("grpo", "dr_grpo") for s in (0, 1)
    }
    assert len(first) == 1
    report = (out / "report.md").read_text()
    assert "| `grpo` |" in report and "| `dr_grpo` |" in report
    for name in ("compare.png", "reward.png", "eval_accuracy.png", "length_correct.png", "length_incorrect.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.slow
def test_model_dataset_and_reward_flags_reach_every_run():
    from drgrpo.train import TrainConfig
    from drgrpo.train.cli.main import build_parser, compare_config_from_args

    data = ["--dataset", "d.jsonl", "--eval-dataset", "e.jsonl"]
    rewards = ["--reward", "pkg.mod:right", "--reward", "pkg.mod:short"]
    args = build_parser().parse_args(["compare", "--model", "m", *data, *rewards, "--steps", "7"])
    config = compare_config_from_args(args)
    # every run's TrainConfig: compare's defaults (no progress bar, one thread) plus exactly the flags given
    assert config.train == TrainConfig(
        progress=False,
        threads=1,
        model="m",
        dataset="d.jsonl",
        eval_dataset="e.jsonl",
        rewards=("pkg.mod:right", "pkg.mod:short"),
        steps=7,
    )
    assert config.losses == ("grpo", "dr_grpo")
    comma = compare_config_from_args(build_parser().parse_args(["compare", "--losses", "dapo,gspo", "--beta", "0.1"]))
    assert comma.losses == ("dapo", "gspo") and comma.beta == 0.1


def test_a_missing_model_directory_fails_before_any_run(tmp_path):
    from drgrpo.train import TrainConfig
    from drgrpo.train.cli.compare import compare

    config = CompareConfig(output_dir=str(tmp_path / "cmp"), train=TrainConfig(model=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        compare(config)
    assert not (tmp_path / "cmp" / "runs").exists()


@pytest.mark.slow
def test_compare_from_a_local_model(tmp_path, tiny_warm_model):
    # every run starts from the given model (no warm start is made): its held-out accuracy at step 0 is
    # the model's own, as `drgrpo eval` computes it in this process, for every loss and seed
    import torch

    from drgrpo.train import TaskConfig, TinyModelConfig, TrainConfig, WarmStartConfig
    from drgrpo.train.cli.compare import compare
    from drgrpo.train.loop.evaluation import evaluate_model
    from helpers.tiny_configs import TINY_TASK, TINY_WARM

    task = TaskConfig(max_operand=9, max_work=2, num_eval=20, seed=3)
    tiny = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=32)
    assert WarmStartConfig(steps=20, batch_size=16, lr=1e-2, model=tiny) == TINY_WARM and task == TINY_TASK
    model_dir = tiny_warm_model  # that warm start, made once (conftest.py)
    settings = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=5, eval_every=2, task=task)
    out = tmp_path / "cmp"
    compare(
        CompareConfig(
            output_dir=str(out),
            seeds=1,  # (two seeds: test_cli_end_to_end_tiny)
            jobs=2,
            train=TrainConfig(model=str(model_dir), **settings, eval_size=8, lr=1e-2, progress=False, threads=1),
        )
    )
    assert not (out / "warm_start").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each run evaluates: the same float sums, so the same greedy tokens
    try:
        expected = evaluate_model(model_dir, TrainConfig(eval_size=8, **settings))["eval/accuracy"]
    finally:
        torch.set_num_threads(threads)
    for loss in ("grpo", "dr_grpo"):
        for seed in (0,):
            run = load_metrics(out / "runs" / loss / f"seed{seed}")
            assert run.steps == [1, 2] and run.eval_steps == [0, 2]
            assert run.eval_accuracy[0] == expected
            state = json.loads(
                (out / "runs" / loss / f"seed{seed}" / "checkpoints" / "step_000002" / "trainer_state.json").read_text()
            )
            assert state["init_model"] == str(model_dir.resolve())
    assert f"initial policy {model_dir}" in (out / "report.md").read_text()


def test_a_cut_off_last_metrics_line_is_left_out_with_a_warning(tmp_path, capsys):
    # a write that did not finish (a full disk): the report reads the complete lines, as drgrpo plot does
    _write_run(tmp_path / "s0", [4.0, 5.0], (0.2, 0.6))
    with open(tmp_path / "s0" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    curves = load_metrics(tmp_path / "s0")
    assert curves.steps == [1, 2] and curves.length_incorrect == [4.0, 5.0] and curves.eval_steps == [0, 2]
    assert "metrics.jsonl: line 5 is cut off" in capsys.readouterr().err


def test_runs_without_evaluations_give_a_report(tmp_path):
    # --eval-every 0: no evaluation lines; the held-out columns read n/a (this raised IndexError before)
    path = tmp_path / "s0"
    path.mkdir()
    rows = [{"step": s, "reward": 0.5, "length_correct": 3.0, "length_incorrect": 5.0} for s in (1, 2)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = summary_rows({"dr_grpo": [load_metrics(path)]})
    assert all(math.isnan(v) for v in row["acc_first"] + row["acc_last"])
    assert row["len_incorrect"] == (5.0, 0.0)


def test_the_warm_start_runs_with_the_settings_of_drgrpo_train(tmp_path, monkeypatch):
    # drgrpo train warm-starts on 1 thread with deterministic algorithms (TrainConfig.apply_torch_settings);
    # compare used torch's default thread count in its own process, 10 to 15 times slower on a busy machine
    import torch

    import drgrpo.train.loop.warmstart as warmstart
    from drgrpo.train.cli.compare import compare

    seen = {}

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        seen.update(threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled())
        raise Stop

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(warmstart, "warm_start", record)
    try:
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(False)
        with pytest.raises(Stop):
            compare(CompareConfig(output_dir=str(tmp_path / "cmp")))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert seen == {"threads": 1, "deterministic": True}


# --------------------------------------------------------------------------- reruns, interruptions, refusals

COMPARE_TINY = [
    *COMPARE_MODEL,
    "--task-max-operand", "9", "--task-num-eval", "20", "--task-max-work", "2", "--warm-start-steps", "10",
    "--warm-start-batch-size", "16", "--warm-start-target-accuracy", "0", "--prompts-per-step", "4",
    "--group-size", "4", "--max-new-tokens", "5", "--eval-every", "0", "--checkpoint-every", "1", "--seeds", "1",
    "--jobs", "1", "--steps", "2", "--reward", "counting_rewards:judge",
]  # fmt: skip
"""Two runs (grpo, then dr_grpo, in one worker process) of 2 steps, 16 reward calls a step, no evaluation."""

COUNTING_REWARDS = """
import os, time
from drgrpo.train.loop.task import exact_match

calls = 0  # one worker trains both runs, one after the other: calls 1-32 are grpo's, 33-64 dr_grpo's


def judge(completion, example):
    global calls
    calls += 1
    if calls > int(os.environ.get("FAIL_AFTER", "1000000")):
        raise RuntimeError(f"judge gave up at call {calls}")
    if calls > int(os.environ.get("SLOW_AFTER", "1000000")):
        time.sleep(0.5)
    return exact_match(completion, example)
"""


def _compare(tmp_path, *args, **env):
    import os

    (tmp_path / "counting_rewards.py").write_text(COUNTING_REWARDS)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tmp_path), **env}
    argv = [sys.executable, "-m", "drgrpo", "compare", "--output-dir", str(tmp_path / "cmp"), *COMPARE_TINY, *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)


def _compare_here(tmp_path, monkeypatch, capsys, *args, **env):
    """``drgrpo compare`` in this process (its runs go to worker processes, which inherit ``env``): (exit code,
    stdout, stderr)."""
    import os

    (tmp_path / "counting_rewards.py").write_text(COUNTING_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("FAIL_AFTER", "SLOW_AFTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["compare", "--output-dir", str(tmp_path / "cmp"), *COMPARE_TINY, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_failed_run_writes_the_report_of_the_others_and_a_rerun_continues(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    # dr_grpo's reward fails in its step 2 (call 49): exit 1 naming it; its step 1 is saved; the report has grpo
    code, stdout, err = _compare_here(tmp_path, monkeypatch, capsys, FAIL_AFTER="48")
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("drgrpo compare: error: RewardError: reward counting_rewards:judge raised"), err
    assert "RuntimeError: judge gave up at call 49" in last
    reward = err.split("Traceback of the reward (most recent call last):\n")[1]  # the reward's own frames, as train's
    assert reward.startswith(f'  File "{tmp_path / "counting_rewards.py"}", line 12, in judge\n'), err
    assert read_state_step(out / "runs" / "dr_grpo" / "seed0") == 1
    report = (out / "report.md").read_text()
    assert (
        "**Partial report**: 1 of 2 runs did not finish (dr_grpo seed 0); the same command again continues them"
        in report
    )
    assert "| `grpo` |" in report and "| `dr_grpo` |" not in report
    grpo = _files(out / "runs" / "grpo" / "seed0")

    # the same command again (the reward no longer fails): grpo is kept as it was, dr_grpo continues from step 1
    code, stdout, err = _compare_here(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "compare: 2 runs (grpo, dr_grpo x 1 seeds), 1 at a time; 1 finished before, kept" in stdout
    assert "dr_grpo seed 0: done, step 2" in stdout
    assert _files(out / "runs" / "grpo" / "seed0") == grpo
    rows = [json.loads(x) for x in (out / "runs" / "dr_grpo" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    state = json.loads((out / "runs" / "dr_grpo" / "seed0" / "checkpoints" / "step_000002" / "trainer_state.json")
                       .read_text())  # fmt: skip
    assert [(h["step"], h["branch"], h["changed"]) for h in state["history"]] == [(1, False, {})]
    report = (out / "report.md").read_text()
    assert "Partial report" not in report and "| `grpo` |" in report and "| `dr_grpo` |" in report

    # other settings on a rerun: refused before any work, one line naming the flag; nothing changes
    before = _files(out)
    code, stdout, err = _compare_here(tmp_path, monkeypatch, capsys, "--lr", "0.01")
    assert code == 2, err
    assert err.strip().splitlines() == [
        f"drgrpo compare: error: --output-dir {out} holds a comparison made with other settings: "
        f"{out / 'runs' / 'grpo' / 'seed0'} has --lr 0.0005 -> 0.01 (its value -> the value given). A rerun "
        "continues each run with the settings that made it: give those, or compare into another --output-dir"
    ]
    assert _files(out) == before


def read_state_step(run):
    from drgrpo.train.run.checkpoint import find_checkpoint, read_state

    return read_state(find_checkpoint(run))["step"]


@pytest.mark.slow
def test_a_signal_stops_every_run_and_writes_the_report_of_those_that_finished(tmp_path):
    import signal

    out = tmp_path / "cmp"
    p = _compare(tmp_path, SLOW_AFTER="32")  # dr_grpo's rewards take 0.5 s each: 8 s a step
    assert p.stdout is not None
    for line in p.stdout:
        if "grpo seed 0: done" in line:
            break
    time.sleep(2.0)  # dr_grpo is in its first step's rewards
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=600)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "drgrpo compare: stopped by a signal"
    assert "compare: wrote " in stdout and "(1 of 2 runs)" in stdout
    report = (out / "report.md").read_text()
    assert "(dr_grpo seed 0); the same command again continues them" in report
    assert read_state_step(out / "runs" / "grpo" / "seed0") == 2
    assert not list((out / "runs" / "dr_grpo" / "seed0" / "checkpoints").glob("step_*"))  # its step 1: abandoned


@pytest.mark.slow
def test_each_loss_is_named_once(tmp_path, capsys):
    from drgrpo.train.cli.main import main

    with pytest.raises(ValueError, match="losses names dr_grpo more than once"):
        CompareConfig(losses=("dr_grpo", "grpo,dr_grpo"))
    out = tmp_path / "cmp"
    assert main(["compare", "--losses", "dr_grpo,dr_grpo", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        "drgrpo compare: error: --losses names dr_grpo more than once: each loss is trained once per seed, into its "
        "own runs/LOSS directory; name each loss once\n"
    )
    assert not out.exists()  # before any work


def test_the_report_says_what_the_comparison_shows(tmp_path):
    # hand-written runs: grpo's incorrect lengths ramp 4 -> 13 in seed 0 and stay at 4 in seed 1 (gap changes 4 and
    # 0: mean 2, sample std sqrt(8) = 2.83); dr_grpo's seed 0 stays at 4 (gap change 0); dr_grpo seed 1 is missing
    _write_run(tmp_path / "g0", [4.0 + i for i in range(10)], (0.2, 0.6))
    _write_run(tmp_path / "g1", [4.0] * 10, (0.4, 0.8))
    _write_run(tmp_path / "d0", [4.0] * 10, (0.3, 0.7))
    curves = {
        "grpo": [load_metrics(tmp_path / "g0"), load_metrics(tmp_path / "g1")],
        "dr_grpo": [load_metrics(tmp_path / "d0")],
    }
    plots = {k: tmp_path / f"{k}.png" for k in ("all", "reward", "eval_accuracy", "length_correct", "length_incorrect")}
    text = render_report(CompareConfig(seeds=2), _Base(), curves, plots, 60.0, ["dr_grpo seed 1"])
    assert "## What this shows" in text
    assert "Dr. GRPO removes that pull, it does not lengthen anything" in text
    assert "docs/length-bias.md" in text
    partial = "**Partial report**: 1 of 4 runs did not finish (dr_grpo seed 1); the same command again continues them"
    assert partial in text
    assert (
        "Reading: over the run the gap (incorrect minus correct length) changed by +2.00 tokens under GRPO and +0.00 "
        "under Dr. GRPO; GRPO's length bias predicts a positive difference, here +2.00, within the two losses' "
        "spreads over seeds added (2.83)."
    ) in text
    one_seed = {"grpo": [load_metrics(tmp_path / "g0")], "dr_grpo": [load_metrics(tmp_path / "d0")]}
    text = render_report(CompareConfig(seeds=1), _Base(), one_seed, plots, 60.0)
    assert "here +4.00, with one seed and so no spread to compare it with (use --seeds 3 or more)." in text
    assert "Partial report" not in text
