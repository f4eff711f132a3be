"""recipes/dr_grpo_qwen2.5_math_1.5b: the paper's Dr. GRPO setting for TRL and for verl, run as shipped.

Nothing is downloaded: a fake MATH (a few problems per level, boxed answers, one problem shared with a fake
MATH-500) goes through ``prepare_math.py``; the TRL recipe trains one optimizer step through the command line
with the model, the data and the reward swapped for local tiny ones (and vLLM, bf16 and the GPUs off); the verl
launch script runs with a stand-in ``python3`` that records its arguments, which are then composed against verl's
own config in ``.venv-verl`` and its loss called once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("trl")

import trl_harness as h
from drgrpo import LossConfig
from drgrpo.integrations.trl_cli import build_parser
from drgrpo.integrations.trl_settings import resolve_loss_config
from verl_env import PYTHON as VERL_PYTHON
from verl_env import SETUP as VERL_SETUP

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "dr_grpo_qwen2.5_math_1.5b"
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # the tiny tokenizer's stand-in chat template

REWARD_MODULE = '''
def words(completions, solution, **kwargs):
    """A reward that varies on an untrained model: the completion's word count modulo 3 (reads both columns)."""
    return [float(len(c[0]["content"].split()) % 3) for c, s in zip(completions, solution)]
'''


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_math", RECIPE / "prepare_math.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_math(root: Path) -> tuple[Path, Path, list[dict]]:
    """A MATH source (train and test splits) and a MATH-500 (test split) as local JSON-lines directories."""
    source, math500 = root / "math", root / "math500"
    source.mkdir()
    math500.mkdir()
    expected = []
    for split in ("train", "test"):
        rows = []
        for i in range(20):
            level = 1 + i % 5
            problem = f"{split} problem {i}: what is {i} / {level}?"
            solution = f"We divide. The answer is $\\boxed{{\\frac{{{i}}}{{{level}}}}}$."
            if i == 19:
                solution = "No boxed answer here."  # dropped: no answer to grade
            rows.append({"problem": problem, "level": f"Level {level}", "type": "Algebra", "solution": solution})
            if level >= 3 and i != 19 and not (split == "test" and i == 2):
                expected.append({"problem": problem, "answer": f"\\frac{{{i}}}{{{level}}}", "level": f"Level {level}"})
        (source / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = {"problem": "test problem 2: what is 2 / 3?", "answer": "\\frac{2}{3}", "level": 3, "solution": "..."}
    (math500 / "test.jsonl").write_text(json.dumps(held_out) + "\n")
    return source, math500, expected


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("math")
    source, math500, expected = fake_math(root)
    load_prepare().main(["--source", str(source), "--math500", str(math500), "--out", str(root / "prepared")])
    return root / "prepared", expected


def test_prepare_math_keeps_levels_3_to_5_without_math500(prepared: tuple[Path, list[dict]]):
    out, expected = prepared
    train = [json.loads(line) for line in (out / "trl" / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"][1]["content"] for r in train] == [e["problem"] for e in expected]
    assert [r["solution"] for r in train] == [f"\\boxed{{{e['answer']}}}" for e in expected]  # nested braces kept
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    assert all(r["prompt"][0] == {"role": "system", "content": system} for r in train)
    test = [json.loads(line) for line in (out / "trl" / "test.jsonl").read_text().splitlines()]
    assert [r["solution"] for r in test] == ["\\boxed{\\frac{2}{3}}"]

    import pandas as pd

    verl = pd.read_parquet(out / "verl" / "train.parquet")
    assert list(verl["data_source"].unique()) == ["DigitalLearningGmbH/MATH-lighteval"]  # verl's math reward
    assert [r["ground_truth"] for r in verl["reward_model"]] == [e["answer"] for e in expected]
    assert [list(p)[1]["content"] for p in verl["prompt"]] == [e["problem"] for e in expected]


def test_last_boxed():
    last_boxed = load_prepare().last_boxed
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("none") is None and last_boxed("\\boxed{unbalanced") is None


# --------------------------------------------------------------------------- TRL


def test_trl_recipe_is_the_papers_setting():
    """The recipe as shipped, read by the command line's parser: the paper's numbers, and no field overridden."""
    script, args, model, _, ours = build_parser().parse_args_and_config(
        ["--config", str(RECIPE / "trl.yaml"), "--use_cpu", "true", "--bf16", "false"]  # (parsing needs no GPU)
    )
    assert model.model_name_or_path == "Qwen/Qwen2.5-Math-1.5B" and script.reward_funcs == ["accuracy_reward"]
    processes = 8  # accelerate_zero2.yaml
    per_step = args.per_device_train_batch_size * processes * args.gradient_accumulation_steps
    per_generation = args.per_device_train_batch_size * processes * args.steps_per_generation
    assert (per_step, per_generation, args.num_generations) == (128, 1024, 8)  # 128 prompts x 8 per rollout
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.weight_decay) == (1e-6, 0.9, 0.95, 0.0)
    assert (args.max_grad_norm, args.lr_scheduler_type.value, args.num_iterations) == (1.0, "constant", 1)
    assert (args.temperature, args.top_p, args.max_completion_length, args.epsilon) == (1.0, 1.0, 3000, 0.2)
    config, changes = resolve_loss_config(ours.loss_config, args)
    assert changes == {}  # every TRL field already agrees with the loss: no warning
    assert config == LossConfig.preset("dr_grpo", max_completion_length=3000, nan_rewards="ignore")
    accelerate = yaml.safe_load((RECIPE / "accelerate_zero2.yaml").read_text())
    assert (accelerate["num_processes"], accelerate["distributed_type"]) == (processes, "DEEPSPEED")
    assert accelerate["deepspeed_config"]["zero_stage"] == 2


@pytest.mark.slow
def test_trl_recipe_trains_one_step_with_local_model_and_data(tmp_path: Path, prepared: tuple[Path, list[dict]]):
    from transformers import AutoTokenizer

    model = h.save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE  # the prepared prompts are chat messages
    tokenizer.save_pretrained(model)
    (tmp_path / "local_rewards.py").write_text(REWARD_MODULE)
    swap = {
        "model_name_or_path": str(model),
        "dataset_name": str(prepared[0] / "trl"),
        "reward_funcs": "local_rewards.words",  # TRL's accuracy_reward needs math-verify, not installed here
        "use_vllm": "false",
        "bf16": "false",
        "dtype": "float32",
        "use_cpu": "true",
        "max_completion_length": "16",  # and with it the constant L
        "max_steps": "1",
        "save_strategy": "steps",
        "save_steps": "1",
        "output_dir": str(tmp_path / "run"),
    }
    cmd = [sys.executable, "-m", "drgrpo.integrations.trl", "--config", str(RECIPE / "trl.yaml")]
    cmd += [arg for key, value in swap.items() for arg in (f"--{key}", value)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "DrGRPOTrainer: loss_config" not in out.stderr  # the recipe's TRL fields agree with its loss
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    (row,) = [r for r in state["log_history"] if "entropy" in r]
    assert row["clip_ratio/high_max"] == 0.0 and "rewards/words/mean" in row  # the first step is on-policy


# --------------------------------------------------------------------------- verl


def test_verl_script_composes_against_verls_config(tmp_path: Path, prepared: tuple[Path, list[dict]]):
    if not VERL_PYTHON.exists():
        pytest.fail(f"the verl environment is missing; create it with: {VERL_SETUP}", pytrace=False)
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "python3").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (stand_in / "python3").chmod(0o755)
    model = h.save_tiny_model(tmp_path / "model")
    env = dict(
        os.environ,
        PATH=f"{stand_in}:{os.environ['PATH']}",
        ARGS_OUT=str(tmp_path / "args.txt"),
        MODEL=str(model),
        DATA=str(prepared[0] / "verl"),
    )
    subprocess.run(["bash", str(RECIPE / "verl.sh"), "trainer.total_epochs=1"], env=env, check=True, timeout=60)
    verl_env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_USE_EXTERNAL", "PYTHONPATH"))}
    cmd = [str(VERL_PYTHON), str(ROOT / "tests" / "verl_live" / "compose_recipe.py")]
    cmd += [str(tmp_path / "args.txt"), str(tmp_path / "report.json")]
    out = subprocess.run(cmd, cwd=ROOT, env=verl_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["loss_fn"] == "dr_grpo" and report["actor"]["loss_mode"] == "drgrpo.dr_grpo"
    assert report["algorithm"] == {"adv_estimator": "grpo", "norm_adv_by_std": False}
    # one on-policy call: per-token loss -A, summed over each completion, divided by N_seq * L with L = 3000
    want = -sum(a * n for a, n in zip(report["advantages"], report["lengths"])) / (len(report["lengths"]) * 3000)
    assert report["loss"] == pytest.approx(want, rel=1e-12)
    actor = report["actor"]
    assert (actor["loss_agg_mode"], actor["loss_scale_factor"]) == ("seq-mean-token-sum-norm", 3000)
    assert (actor["clip_ratio_low"], actor["clip_ratio_high"], actor["clip_ratio_c"]) == (0.2, 0.2, None)
    assert (actor["lr"], actor["betas"], actor["weight_decay"], actor["clip_grad"]) == (1e-6, [0.9, 0.95], 0.0, 1.0)
    assert (actor["ppo_epochs"], actor["use_kl_loss"], actor["lr_scheduler_type"]) == (1, False, "constant")
    assert report["rollout"] == {"n": 8, "temperature": 1.0, "top_p": 1.0, "name": "vllm"}
    data = report["data"]
    assert (data["train_batch_size"], data["max_response_length"], data["max_prompt_length"]) == (128, 3000, 1024)
    assert data["train_files"] == str(prepared[0] / "verl" / "train.parquet") and report["model"] == str(model)
    # the same batches as the TRL recipe: 128 prompts x 8 per rollout, 16 x 8 = 128 completions per optimizer step
    assert report["gpus"] == 8 and actor["ppo_mini_batch_size"] * report["rollout"]["n"] == 128
