"""recipes/dr_grpo_qwen2.5_math_1.5b: the paper's Dr. GRPO setting for TRL and for verl, run as shipped.

Nothing is downloaded: a fake MATH (a few problems per level, boxed answers, one problem shared with a fake
MATH-500) and a stand-in file in each evaluation benchmark's format go through ``prepare_math.py``; the TRL
recipe trains one optimizer step, evaluating before and after, through its launcher ``train_trl.py`` with the
model, the data and the reward swapped for local tiny ones (and vLLM, bf16 and the GPUs off); the verl launch
script runs with a stand-in ``python3`` that records its arguments, which are then composed against verl's own
config in ``.venv-verl``, its loss called once and its reward manager run on hand-made completions.
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


def one(completions, **kwargs):
    """1 for every completion: what is left of it after the recipe's rule is the share of untruncated ones."""
    return [1.0] * len(completions)


def ended(completions, completion_ids, **kwargs):
    """By hand: 1 for a completion that stopped by itself (shorter than the budget, or an end token last)."""
    return [float(len(ids) < BUDGET or ids[-1] in END) for ids in completion_ids]
'''

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

BENCHMARK_FILES = {
    # name: (split file, rows in that benchmark's columns, the answers the recipe should write)
    "aime2024": ("train.jsonl", [{"ID": "2024-I-1", "Problem": "Find 6 x 7.", "Answer": "42"}], ["42"]),
    "amc": (
        "test.jsonl",
        [{"problem": "What is 2 + 3?", "answer": 5.0}, {"problem": "Half of 3?", "answer": 1.5}],
        ["5", "1.5"],
    ),
    "minerva": ("test.jsonl", [{"question": "Speed of light in m/s?", "answer": "3e8"}], ["3e8"]),
    "olympiadbench": ("train.jsonl", [{"question": "Roots of x^2 = 1?", "final_answer": ["1", "-1"]}], ["1, -1"]),
}
"""Stand-ins for the benchmarks' files: the Hub copies' columns (one split, named train or test)."""


def byte_tokenizer(path: Path) -> Path:
    """A tokenizer with one token per UTF-8 byte (and ``<eos>``), TEMPLATE as its chat template, saved at ``path``.

    A text's token count is its length in bytes, and decoding gives the text back: lengths can be derived by hand.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return path


def load_prepare():
    return load_module("prepare_math")


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPE / f"{name}.py")
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
    for name, (split_file, rows, _) in BENCHMARK_FILES.items():
        (root / name).mkdir()
        (root / name / split_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return source, math500, expected


def benchmark_flags(root: Path) -> list[str]:
    return [arg for name in BENCHMARK_FILES for arg in (f"--{name}", str(root / name))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("math")
    source, math500, expected = fake_math(root)
    argv = ["--source", str(source), "--math500", str(math500), "--out", str(root / "prepared")]
    load_prepare().main(argv + benchmark_flags(root))
    return root / "prepared", expected


def test_prepare_math_keeps_levels_3_to_5_without_math500(prepared: tuple[Path, list[dict]]):
    out, expected = prepared
    train = [json.loads(line) for line in (out / "trl" / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"][1]["content"] for r in train] == [e["problem"] for e in expected]
    assert [r["solution"] for r in train] == [f"\\boxed{{{e['answer']}}}" for e in expected]  # nested braces kept
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    assert all(r["prompt"][0] == {"role": "system", "content": system} for r in train)
    test = [json.loads(line) for line in (out / "trl" / "test.jsonl").read_text().splitlines()]
    assert [r["solution"] for r in test if r["benchmark"] == "math500"] == ["\\boxed{\\frac{2}{3}}"]

    import pandas as pd

    verl = pd.read_parquet(out / "verl" / "train.parquet")
    assert list(verl["data_source"].unique()) == ["DigitalLearningGmbH/MATH-lighteval"]  # verl's math reward
    assert [r["ground_truth"] for r in verl["reward_model"]] == [e["answer"] for e in expected]
    assert [list(p)[1]["content"] for p in verl["prompt"]] == [e["problem"] for e in expected]


def test_prepare_math_writes_every_benchmark_for_evaluation(prepared: tuple[Path, list[dict]]):
    """Each benchmark's stand-in, in its own columns, becomes questions with the Qwen-Math template and answers."""
    out, _ = prepared
    test = [json.loads(line) for line in (out / "trl" / "test.jsonl").read_text().splitlines()]
    import pandas as pd

    for name, (_, rows, answers) in BENCHMARK_FILES.items():
        mine = [r for r in test if r["benchmark"] == name]
        questions = [r.get("problem", r.get("question", r.get("Problem"))) for r in rows]
        assert [r["prompt"] for r in mine] == [
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions
        ]
        assert [r["solution"] for r in mine] == [f"\\boxed{{{a}}}" for a in answers]
        verl = pd.read_parquet(out / "verl" / f"test_{name}.parquet")  # verl reports per data_source
        assert list(verl["data_source"]) == [name] * len(rows)
        assert [r["ground_truth"] for r in verl["reward_model"]] == answers
    assert sorted(p.name for p in (out / "verl").glob("test_*.parquet")) == sorted(
        f"test_{n}.parquet" for n in ["math500", *BENCHMARK_FILES]
    )


def test_prepare_math_refuses_a_benchmark_without_its_columns(tmp_path: Path):
    source, math500, _ = fake_math(tmp_path)
    bad = tmp_path / "bad_amc"
    bad.mkdir()
    (bad / "test.jsonl").write_text(json.dumps({"text": "What is 2 + 3?", "label": 5}) + "\n")
    argv = ["--source", str(source), "--math500", str(math500), "--amc", str(bad), "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"--amc: got columns \['text', 'label'\], expected a question column"):
        load_prepare().main(argv)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_prepare_math_drops_prompts_over_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture):
    """With a tokenizer of one token per byte, a prompt's length is the bytes of its rendering: system + user."""
    source, math500, expected = fake_math(tmp_path)
    tokenizer = byte_tokenizer(tmp_path / "tokenizer")
    lengths = {e["problem"]: len(f"{SYSTEM} {e['problem']} ".encode()) for e in expected}
    limit = sorted(lengths.values())[len(lengths) // 2]  # some prompts at the limit (kept), some over (dropped)
    want = [e["problem"] for e in expected if lengths[e["problem"]] <= limit]
    assert 0 < len(want) < len(expected) and limit in lengths.values()
    argv = ["--source", str(source), "--math500", str(math500), "--out", str(tmp_path / "out")]
    load_prepare().main([*argv, "--tokenizer", str(tokenizer), "--max-prompt-length", str(limit)])
    train = [json.loads(line) for line in (tmp_path / "out" / "trl" / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"][1]["content"] for r in train] == want
    math500_length = len(f"{SYSTEM} test problem 2: what is 2 / 3? ".encode())
    dropped_test = int(math500_length > limit)
    assert (
        f"dropped {len(expected) - len(want)} training and {dropped_test} test prompts longer than {limit} tokens"
        in (capsys.readouterr().out)
    )
    with pytest.raises(SystemExit) as exit_info:
        load_prepare().main([*argv, "--max-prompt-length", "0"])
    assert exit_info.value.code == 2
    assert "--max-prompt-length: got 0, expected a positive number of tokens" in capsys.readouterr().err


def test_truncated_completion_rule():
    """Cut off = the whole budget used and no end token last; a completion ending on its last slot is complete."""
    rules = load_module("paper_rules")
    end = {2, 9}
    assert rules.is_truncated([5, 6, 7, 8], budget=4, end_ids=end)  # budget used, no end token
    assert not rules.is_truncated([5, 6, 7, 2], budget=4, end_ids=end)  # ended on the last slot
    assert not rules.is_truncated([5, 6, 9], budget=4, end_ids=end)  # ended early
    assert not rules.is_truncated([5, 6, 7], budget=4, end_ids=end)  # shorter than the budget: it stopped
    assert rules.zero_truncated([1.0, 1.0, 0.5], [[5, 6], [5, 6, 7, 8], [5, 6, 7, 9]], 4, end) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="budget: got 0, expected the generation budget"):
        rules.is_truncated([1], budget=0, end_ids=end)
    with pytest.raises(ValueError, match=r"rewards: got 1, expected one per completion \(2\)"):
        rules.zero_truncated([1.0], [[1], [2]], 4, end)


def test_greedy_generation_switches_only_generation_and_restores_it():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    rules = load_module("paper_rules")
    trainer = SimpleNamespace(
        generation_config=GenerationConfig(do_sample=True, temperature=0.7),
        vllm_generation=SimpleNamespace(temperature=0.7),
        temperature=0.7,
    )
    with rules.greedy_generation(trainer):
        assert trainer.generation_config.do_sample is False and trainer.vllm_generation.temperature == 0.0
        assert trainer.temperature == 0.7  # the log-probabilities' temperature is not touched
    assert trainer.generation_config.do_sample is True and trainer.vllm_generation.temperature == 0.7
    with pytest.raises(RuntimeError), rules.greedy_generation(trainer):
        raise RuntimeError("evaluation failed")
    assert trainer.generation_config.do_sample is True and trainer.vllm_generation.temperature == 0.7


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
    # evaluation as the paper's: every 16 rollouts (16 x 8 optimizer steps), one greedy completion per question
    assert script.dataset_test_split == "test" and args.eval_strategy.value == "steps"
    assert args.eval_steps == 16 * (per_generation // per_step) and args.eval_on_start is True
    assert args.num_generations_eval == 1
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
    from transformers import GenerationConfig

    declared = GenerationConfig.from_pretrained(model).eos_token_id
    end = {tokenizer.eos_token_id} | set([declared] if isinstance(declared, int) else declared or [])
    (tmp_path / "local_rewards.py").write_text(f"BUDGET = 6\nEND = {sorted(end)}\n" + REWARD_MODULE)
    swap = {
        "model_name_or_path": str(model),
        "dataset_name": str(prepared[0] / "trl"),
        "use_vllm": "false",
        "bf16": "false",
        "dtype": "float32",
        "use_cpu": "true",
        "max_completion_length": "6",  # and with it the constant L; most untrained completions are cut off
        "eval_steps": "1",
        "per_device_eval_batch_size": "8",
        "max_steps": "1",
        "save_strategy": "steps",
        "save_steps": "1",
        "output_dir": str(tmp_path / "run"),
    }
    cmd = [sys.executable, str(RECIPE / "train_trl.py"), "--config", str(RECIPE / "trl.yaml")]
    cmd += [arg for key, value in swap.items() for arg in (f"--{key}", value)]
    # TRL's accuracy_reward needs math-verify, not installed here
    cmd += ["--reward_funcs", "local_rewards.words", "local_rewards.one", "local_rewards.ended"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "DrGRPOTrainer: loss_config" not in out.stderr  # the recipe's TRL fields agree with its loss
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    (row,) = [r for r in state["log_history"] if "entropy" in r]
    assert row["clip_ratio/high_max"] == 0.0 and "rewards/words/mean" in row  # the first step is on-policy
    # the cut-off completions (counted by hand in ``ended``) get 0 from every reward: stock TRL would log one = 1
    assert 0.0 < row["rewards/ended/mean"] < 1.0
    assert row["rewards/one/mean"] == pytest.approx(row["rewards/ended/mean"], abs=1e-6)
    # evaluated before training and after step 1, on every benchmark's questions, one completion each
    evals = [r for r in state["log_history"] if "eval_rewards/one/mean" in r]
    assert [r["step"] for r in evals] == [0, 1]
    assert all(r["eval_rewards/one/mean"] == pytest.approx(r["eval_rewards/ended/mean"]) for r in evals)


# --------------------------------------------------------------------------- verl


@pytest.mark.slow
def test_verl_script_composes_against_verls_config(tmp_path: Path, prepared: tuple[Path, list[dict]]):
    if not VERL_PYTHON.exists():
        pytest.fail(f"the verl environment is missing; create it with: {VERL_SETUP}", pytrace=False)
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "python3").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (stand_in / "python3").chmod(0o755)
    model = byte_tokenizer(h.save_tiny_model(tmp_path / "model"))  # the reward grades decoded text: bytes round-trip
    env = dict(
        os.environ,
        PATH=f"{stand_in}:{os.environ['PATH']}",
        ARGS_OUT=str(tmp_path / "args.txt"),
        MODEL=str(model),
        DATA=str(prepared[0] / "verl"),
    )
    empty = dict(env, DATA=str(tmp_path))  # no test_*.parquet: refused before verl starts
    refused = subprocess.run(["bash", str(RECIPE / "verl.sh")], env=empty, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and not (tmp_path / "args.txt").exists()
    assert (
        refused.stderr == f"verl.sh: no {tmp_path}/test_*.parquet (DATA={tmp_path}); write them with prepare_math.py\n"
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
    # evaluation as the paper's: every benchmark prepared, greedy, one per question, every 16 steps and before
    names = ["math500", *BENCHMARK_FILES]
    assert sorted(report["evaluation"].pop("val_files")) == sorted(
        str(prepared[0] / "verl" / f"test_{n}.parquet") for n in names
    )
    assert report["evaluation"] == {
        "do_sample": False,
        "temperature": 0,
        "n": 1,
        "test_freq": 16,
        "val_before_train": True,
    }
    assert report["filter_overlong_prompts"] is True  # prompts over data.max_prompt_length are dropped
    # the reward, through the manager and function verl resolves from the script: graded boxed answer, 0 if cut off
    rewards = report["rewards"]
    assert (rewards["manager"], rewards["budget"]) == ("TruncatedZeroRewardManager", 3000)
    scores = {name: case["score"] for name, case in rewards["scores"].items()}
    assert scores == {
        "right, ended": 1.0,
        "right, ended on the last slot": 1.0,  # 3000 tokens, the last one the end token: complete
        "right, cut off": 0.0,  # 3000 tokens, the right answer last, no end token
        "wrong, cut off": 0.0,
        "right, one short of the budget": 1.0,  # 2999 tokens: it stopped by itself
    }
    assert [c["length"] for c in rewards["scores"].values()] == [1 + 13 + 1, 3000, 3000, 3000, 2999]
