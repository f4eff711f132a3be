"""The real ``drgrpo`` command line in subprocesses (tiny settings), and its error paths."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drgrpo.train import TrainConfig
from drgrpo.train.cli.main import build_parser, main, train_config_from_args
from helpers.cli_runs import ENV, TINY


def drgrpo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "drgrpo", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_smoke_train_eval_plot(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = drgrpo("train", "--output-dir", str(run), "--steps", "2", "--eval-every", "1", *TINY)
    assert p.returncode == 0, p.stderr
    lines = rows(run)
    evals = [r for r in lines if "eval/accuracy" in r]
    steps = [r for r in lines if "reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["eval/num_prompts"] == 8 for r in evals)
    for r in steps:
        for key in (
            "reward",
            "accuracy",
            "length",
            "length_correct",
            "length_incorrect",
            "kl",
            "clip_frac_low",
            "clip_frac_high",
            "grad_norm",
            "tokens_per_s",
            "loss",
        ):
            assert key in r, key
        assert 1 <= r["length"] <= 5
        # truncated rows are exactly 5 tokens long, the others at least 1: a bound on the mean length
        assert 0 <= r["frac_truncated"] <= 1
        assert r["length"] >= 5 * r["frac_truncated"] + 1 * (1 - r["frac_truncated"]) - 1e-9
        assert (r["frac_truncated"] * 16).is_integer()  # 4 prompts x G = 4 completions
    assert all(0 <= r["eval/frac_truncated"] <= 1 for r in evals)
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"

    # drgrpo eval recomputes the last held-out evaluation in a fresh process: same model, same prompts, greedy
    p = drgrpo("eval", "--model", str(ckpt), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["eval/accuracy"] == evals[-1]["eval/accuracy"]
    assert report["eval/length"] == evals[-1]["eval/length"]
    assert report["eval/num_prompts"] == 8
    # the run directory and its checkpoints/latest name the same checkpoint
    for name in (run, run / "checkpoints" / "latest"):
        p = drgrpo("eval", "--model", str(name), "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout.strip().splitlines()[-1]) == report

    p = drgrpo("plot", str(run))
    assert p.returncode == 0, p.stderr
    for name in ("reward", "accuracy", "lengths", "loss", "kl", "summary"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "drgrpo",
            "train",
            "--output-dir",
            str(run),
            "--steps",
            "100000",
            "--eval-every",
            "0",
            *TINY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave the training process behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    last = rows(run)[-1]["step"]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last:06d}"  # the checkpoint is the last completed step
    state = json.loads((run / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] == last

    p = drgrpo("train", "--resume", str(run), "--steps", str(last + 2), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert [r["step"] for r in rows(run) if "reward" in r] == list(range(1, last + 3))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model"], "--model '/no/such/model' is not a directory"),
        (["--loss", "nope"], "unknown preset 'nope'; valid presets: "),
        (["--loss", "dr_grpo", "--clip-hgh", "0.3"], None),  # argparse: unknown flag
        (["--reward", "nomodule_xyz:f"], "cannot import module 'nomodule_xyz'"),
        (["--resume", "/no/such/run"], "no checkpoint under '/no/such/run'"),
    ],
)
def test_errors_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message) -> None:
    out = tmp_path / "out"
    if message is None:
        with pytest.raises(SystemExit):
            main(["train", "--output-dir", str(out), *args])
    else:
        assert main(["train", "--output-dir", str(out), *args]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was created: the error came first


def test_dataset_without_prompt_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n{"question": "2 + 2 =", "answer": "4"}\n')
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--dataset", str(data)]) == 2
    assert "d.jsonl:2: no 'prompt' field" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flags_map_to_config_fields() -> None:
    ns = build_parser().parse_args(
        [
            "train",
            "--loss",
            "dapo",
            "--clip-high",
            "0.3",
            "--beta",
            "0.01",
            "--kl",
            "k1",
            "--lr",
            "1e-4",
            "--no-ref-kl",
            "--task-max-operand",
            "20",
            "--tiny-hidden-size",
            "32",
            "--reward",
            "a:b",
            "--reward",
            "c:d",
            "--reward-weights",
            "1",
            "0.5",
        ]
    )
    cfg = train_config_from_args(ns)
    assert isinstance(cfg, TrainConfig)
    assert cfg.loss == "dapo" and cfg.lr == 1e-4 and cfg.ref_kl is False
    assert dict(cfg.loss_overrides) == {"clip_high": 0.3, "beta": 0.01, "kl": "k1"}
    assert cfg.task.max_operand == 20 and cfg.warm_start.model.hidden_size == 32
    assert cfg.rewards == ("a:b", "c:d") and cfg.reward_weights == (1.0, 0.5)
    lc = cfg.loss_config()
    assert (lc.clip_high, lc.beta, lc.kl, lc.aggregation) == (0.3, 0.01, "k1", "token-mean")
    # every TrainConfig field is documented in --help
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    for flag in (
        "--group-size",
        "--max-new-tokens",
        "--ppo-epochs",
        "--micro-batch-size",
        "--temperature",
        "--top-p",
        "--grad-clip",
        "--seed",
        "--device",
        "--dtype",
        "--fused",
        "--resume",
        "--clip-low",
        "--aggregation",
    ):
        assert flag in help_text, flag
