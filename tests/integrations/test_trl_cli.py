"""``python -m drgrpo.integrations.trl`` / ``drgrpo trl``: ``trl grpo``'s command line, training with DrGRPOTrainer.

Everything is local: the tiny model and a JSON-lines dataset are written into the test's directory, a reward
module sits in the working directory (a dotted path, as ``trl grpo`` imports them), and the run is two optimizer
steps on a CPU.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("trl")

import trl_harness as h
from drgrpo import LossConfig
from drgrpo.integrations.trl_cli import DrGRPOArguments, build_parser, loss_config_from, reward_function

# the harness's reward (the number of digit tokens, minus a third of the others), as a module in the working directory
REWARD_MODULE = "from typing import Any\n\n" + inspect.getsource(h.digit_reward).replace("digit_reward", "digits")

RECIPE = """\
# trl grpo's fields (script, GRPOConfig, ModelConfig) plus drgrpo's loss_config and fused
model_name_or_path: {model}
dataset_name: {data}
reward_funcs: [my_rewards.digits, get_soft_overlong_punishment]
output_dir: {out}
max_steps: 2
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
num_generations: 4
max_completion_length: 8
learning_rate: 1.0e-3
use_cpu: true
bf16: false
report_to: none
save_strategy: steps
save_steps: 2
logging_steps: 1
seed: 0
loss_config: dr_grpo
fused: true
env:
  HF_HUB_OFFLINE: "1"
"""


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with the tiny model, a local dataset directory and a reward module."""
    root = tmp_path_factory.mktemp("cli")
    h.save_tiny_model(root / "model")
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w") as f:
        for row in h.train_dataset(32):
            f.write(json.dumps(row) + "\n")
    (root / "my_rewards.py").write_text(REWARD_MODULE)
    return root


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``cmd`` in ``cwd``; a timeout fails the test with what the command had printed."""
    try:
        return subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        printed = [x.decode() if isinstance(x, bytes) else (x or "") for x in (error.stdout, error.stderr)]
        pytest.fail(f"{' '.join(cmd[:4])} ... timed out after {timeout} s:\n{''.join(printed)[-6000:]}")


def write_recipe(workdir: Path, name: str, **replace: str) -> Path:
    text = RECIPE.format(model=workdir / "model", data=workdir / "data", out=workdir / name)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = workdir / f"{name}.yaml"
    path.write_text(text)
    return path


def check_two_steps(workdir: Path, name: str, code: int, output: str) -> dict:
    """The run ``name`` ended with ``code`` 0 (``output``: what it printed, for the failure message) after two
    optimizer steps, a checkpoint and the model; returns its last logged row."""
    assert code == 0, output[-4000:]
    run = workdir / name
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (run / "model.safetensors").exists()  # trl grpo saves the model at the end
    logged = [row for row in state["log_history"] if "entropy" in row]
    assert len(logged) == 2
    return logged[-1]


def test_two_steps_from_a_yaml_file(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In this process (``main`` of ``python -m drgrpo.integrations.trl``): the process-level paths, exit codes
    and stderr, are checked by the accelerate launch and the exit-2 tests below."""
    from drgrpo.integrations.trl import main

    recipe = write_recipe(workdir, "run")
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))  # my_rewards, as trl grpo imports a reward module
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and restored after the recipe's env: block sets it
    with caplog.at_level("WARNING", logger="drgrpo"):
        code = main(["--config", str(recipe)])
    row = check_two_steps(workdir, "run", code, caplog.text)
    # fused=True logs TRL's metrics from the fused pass; the reward functions are the two given
    assert {"clip_ratio/low_min", "clip_ratio/high_max", "drgrpo/ratio_mean"} <= set(row)
    assert {"rewards/digits/mean", "rewards/soft_overlong_punishment_reward/mean"} <= set(row)
    # the loss config set GRPOConfig's defaults: a WARNING with the old and new values
    assert "loss_type 'dapo' -> 'dr_grpo'" in caplog.text and "scale_rewards 'group' -> 'none'" in caplog.text


@pytest.mark.slow
def test_under_accelerate_launch_and_the_drgrpo_alias(workdir: Path):
    """accelerate launch, two CPU processes (accelerate's MULTI_CPU: DDP over gloo), through ``drgrpo trl``
    (``-m drgrpo trl``), with flags over the file."""
    recipe = write_recipe(workdir, "launched")
    with socket.socket() as s:  # a free port for the rendezvous (other test runs may share the machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "drgrpo", "trl", "--config", str(recipe), "--loss_config", "dapo", "--fused", "false"]  # fmt: skip
    out = run(cmd, workdir)
    check_two_steps(workdir, "launched", out.returncode, out.stdout + out.stderr)
    # each process built its trainer: dapo's clip-higher, from the command line's --loss_config, on both
    assert out.stderr.count("epsilon_high unset -> 0.28") == 2


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({"loss_config: dr_grpo": "loss_config: dr-grpo"}, "unknown preset 'dr-grpo'"),
        ({"my_rewards.digits": "digits"}, "reward function 'digits' is neither one of TRL's"),
        ({"my_rewards.digits": "my_rewards.nothing"}, "module 'my_rewards' has no function 'nothing'"),
        ({"my_rewards.digits": "no_such_module.f"}, "cannot import 'no_such_module'"),
        ({"seed: 0": "seed: 0\nlearning_rat: 1.0"}, "Unknown arguments from config file: ['--learning_rat'"),
        ({"loss_config: dr_grpo": "loss_config: {clip_high: 0.3}"}, "has no preset: add preset: <name>"),
        ({"max_steps: 2": "max_steps: 2\nscale_rewards: batch"}, "scale_rewards='batch' contradicts"),
        (  # the fix is a flag of this command, not Python
            {"max_steps: 2": "max_steps: 2\nscale_rewards: batch"},
            """into the loss config: --loss_config '{"preset": "dr_grpo", "max_completion_length": 8, """
            """"advantage_std": "batch"}'""",
        ),
        ({"model_name_or_path:": "model_name_or_path: ''  #"}, "no model: set --model_name_or_path"),
        ({"seed: 0": "seed: 0\ndataset_train_split: training"}, "no split 'training' (--dataset_train_split; its"),
        (  # the estimator's name, with the choices and a flag for the fix
            {"seed: 0": "seed: 0\nadvantage: rlooo"},
            "advantage must be one of grpo, rloo, reinforce_plus_plus_baseline, opo, grpo_passk, gpg; got 'rlooo' "
            "(e.g. --advantage rloo)",
        ),
    ],
)
def test_configuration_errors_are_one_line_with_exit_code_2(
    workdir: Path, replace: dict, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from drgrpo.train.cli import main

    recipe = write_recipe(workdir, "bad", **replace)
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["trl", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("drgrpo trl: error: ")]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert not (workdir / "bad").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_the_command_exits_with_2_and_one_line(workdir: Path):
    # python -m drgrpo.integrations.trl, as a process (drgrpo trl's exit 2 in this process: the test above)
    recipe = write_recipe(workdir, "bad2", **{"loss_config: dr_grpo": "loss_config: dr-grpo"})
    cmd = [sys.executable, "-m", "drgrpo.integrations.trl", "--config", str(recipe)]
    out = run(cmd, workdir, timeout=300)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m drgrpo.integrations.trl: error: unknown preset 'dr-grpo'")
    assert "Traceback" not in out.stderr
    assert not (workdir / "bad2").exists()  # nothing trained, nothing written


def test_loss_config_forms():
    assert loss_config_from(None, 8) is None and loss_config_from("grpo", 8) == "grpo"
    mapped = loss_config_from({"preset": "dr_grpo", "clip_high": 0.28}, 3000)
    assert mapped == LossConfig.preset("dr_grpo", max_completion_length=3000, clip_high=0.28)
    assert loss_config_from('{"preset": "dr_grpo", "max_completion_length": 100}', 3000).max_completion_length == 100
    assert loss_config_from({"preset": "dapo", "clip_high": 0.3}, 8) == LossConfig.preset("dapo", clip_high=0.3)
    with pytest.raises(ValueError, match="is not a preset name or a JSON object"):
        loss_config_from("{preset: dapo", 8)
    with pytest.raises(TypeError, match="--loss_config must be a preset name or a mapping"):
        loss_config_from(3, 8)


def test_the_parser_is_trl_grpos_plus_two_fields(tmp_path: Path):
    parser = build_parser()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            model_name_or_path: m
            dataset_name: d
            output_dir: {tmp_path}
            use_cpu: true
            bf16: false
            loss_config: {{preset: dapo, clip_high: 0.3}}
            lora_r: 8
            """
        )
    )
    argv = ["--config", str(recipe), "--fused", "true", "--advantage", "opo"]
    script, grpo, model, _, ours = parser.parse_args_and_config(argv)
    assert (script.dataset_name, model.model_name_or_path, model.lora_r, grpo.output_dir) == (
        "d",
        "m",
        8,
        str(tmp_path),
    )
    assert isinstance(ours, DrGRPOArguments) and ours.fused is True and ours.advantage == "opo"
    assert ours.loss_config == {"preset": "dapo", "clip_high": 0.3}


def test_reward_functions_by_trl_name_or_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from trl.rewards import think_format_reward

    assert reward_function("think_format_reward") is think_format_reward
    overlong = reward_function("get_soft_overlong_punishment")  # as trl grpo builds it: 1280 tokens, 256 cache
    assert overlong(completion_ids=[[0] * 1000, [0] * 1152]) == pytest.approx([0.0, -0.5])
    (tmp_path / "rewards_here.py").write_text("def r(completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward_function("rewards_here.r")(["a"]) == [1.0]
    assert reward_function("rewards_here:r")(["a"]) == [1.0]
