"""Input checked at load: datasets (directory, UTF-8, empty or too long prompts) and models that need remote code.

Every refusal is a configuration error (exit 2, one line naming the file and the line) before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from drgrpo.train.loop.data import load_jsonl
from drgrpo.train.loop.model import check_local_code, load_model, load_tokenizer
from drgrpo.train.loop.setup import CHARS_PER_TOKEN, PromptCheck, prompt_check
from drgrpo.train.loop.tiny import build_model, build_tokenizer
from drgrpo.train.train_config import TrainConfig
from helpers.cli_runs import ENV, TINY, error_line
from helpers.tiny_configs import TINY_MODEL

CONTEXT = 64  # TINY's model: --tiny-max-positions keeps its default
NEW = 5  # TINY's --max-new-tokens


def jsonl(path: Path, *prompts: object) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "0"}) + "\n" for p in prompts))
    return path


def digits(n: int) -> str:
    """A prompt of exactly n tokens for the built-in word-level tokenizer (one token per space-separated digit)."""
    return " ".join("1" * n)


def refused(capsys: pytest.CaptureFixture, *args: str, command: str = "train") -> str:
    return error_line(capsys, command, *args)


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("flag", ["--dataset", "--eval-dataset"])
def test_a_directory_for_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str) -> None:
    data = jsonl(tmp_path / "train.jsonl", "1 + 1 =")
    args = ["--dataset", str(data)] if flag == "--eval-dataset" else []
    line = refused(capsys, "--output-dir", str(tmp_path / "out"), *TINY, *args, flag, str(tmp_path))
    assert line.endswith(f"{flag} '{tmp_path}' is a directory; expected a JSONL file (one JSON object per line)")
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "1 + 1 ="}\n\n{"prompt": "2 \xff 2 ="}\n')  # line 3, 15th byte
    line = refused(capsys, "--output-dir", str(tmp_path / "out"), *TINY, "--dataset", str(data))
    assert line.endswith(f"{data}:3: not valid UTF-8 (byte 0xff at byte 15 of the line); save the file as UTF-8")
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_is_not_an_error(tmp_path: Path) -> None:
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"prompt": "1 + 1 ="}\n')
    assert load_jsonl(data) == [{"prompt": "1 + 1 ="}]


@pytest.mark.parametrize("prompt", ["", "   \n ", []])
def test_an_empty_prompt(tmp_path: Path, capsys: pytest.CaptureFixture, prompt: object) -> None:
    data = jsonl(tmp_path / "d.jsonl", "1 + 1 =", prompt)
    line = refused(capsys, "--output-dir", str(tmp_path / "out"), *TINY, "--dataset", str(data))
    assert line.endswith(f"{data}:2: the prompt ('prompt') is empty")


def test_a_prompt_with_no_tokens(tmp_path: Path) -> None:
    # text that the tokenizer keeps nothing of (a stand-in tokenizer that drops everything): no prompt token for
    # generation to start from
    class DropsEverything:
        chat_template = None

        def __call__(self, text: str, **kwargs) -> dict:
            return {"input_ids": []}

    data = jsonl(tmp_path / "d.jsonl", "1 + 1 =")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: the prompt has no tokens \(empty after tokenization\)"):
        load_jsonl(data, check_prompt=PromptCheck(DropsEverything(), CONTEXT, NEW))


def test_prompt_longer_than_the_context(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    room = CONTEXT - NEW  # 59 tokens of prompt, then 5 new tokens: the model's 64 positions
    ok = jsonl(tmp_path / "ok.jsonl", digits(room))
    assert load_jsonl(ok, check_prompt=PromptCheck(build_tokenizer(), CONTEXT, NEW)) == [
        {"prompt": digits(room), "answer": "0"}
    ]
    data = jsonl(tmp_path / "long.jsonl", "1 + 1 =", "2 + 2 =", digits(room + 1))
    line = refused(capsys, "--output-dir", str(tmp_path / "out"), *TINY, "--dataset", str(data))
    assert line.endswith(
        f"{data}:3: the prompt is 60 tokens, more than the model's context leaves for it: 64 tokens "
        "(--tiny-max-positions) minus --max-new-tokens 5 is 59; shorten the prompt or lower --max-new-tokens"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_50_mb_prompt_is_refused_without_tokenizing_it(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"prompt": "1 " * 25_000_000}) + "\n")  # 50 MB on one line
    tokenizer, seen = build_tokenizer(), []

    class Spy:  # the tokenizer, recording how much text it is given
        chat_template = None

        def __call__(self, text: str, **kwargs):
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"big\.jsonl:1: the prompt is at least 1,888 tokens \(in its first 3,776 "):
        load_jsonl(big, check_prompt=PromptCheck(Spy(), CONTEXT, NEW))
    assert seen == [CHARS_PER_TOKEN * (CONTEXT - NEW)]  # 3,776 characters tokenized, not 50,000,000
    assert time.perf_counter() - started < 60  # reading and parsing 50 MB; generous for a loaded CI machine


def test_max_new_tokens_leaves_no_room_for_a_prompt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = jsonl(tmp_path / "d.jsonl", "1 + 1 =")
    args = ["--output-dir", str(tmp_path / "out"), *TINY, "--dataset", str(data), "--max-new-tokens", "64"]
    line = refused(capsys, *args)
    assert line.endswith("--max-new-tokens 64 leaves no room for a prompt in the model's context of 64 tokens "
                         "(--tiny-max-positions)")  # fmt: skip


def test_chat_messages_without_a_chat_template(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"role": "user", "content": "1 + 1 ="}])
    line = refused(capsys, "--output-dir", str(tmp_path / "out"), *TINY, "--dataset", str(data))
    assert line.endswith(f"{data}:1: a prompt given as chat messages needs a tokenizer with a chat template")


def test_the_context_of_a_model_directory(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path / "model")  # max_position_embeddings = 32 in its config.json
    check = prompt_check(model_dir, TrainConfig(max_new_tokens=5))
    assert (check.context, check.source) == (32, f"max_position_embeddings in {model_dir / 'config.json'}")
    assert check(digits(27)) is None
    assert check(digits(28)).startswith("the prompt is 28 tokens, more than the model's context leaves for it: 32")


def test_eval_dataset_of_drgrpo_eval_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = save_tiny(tmp_path / "model")
    data = jsonl(tmp_path / "held.jsonl", "1 + 1 =", "")
    line = refused(capsys, "--model", str(model_dir), "--eval-dataset", str(data), command="eval")
    assert line.endswith(f"{data}:2: the prompt ('prompt') is empty")


# --------------------------------------------------------------------------- models that need remote code

CUSTOM_CODE = """
from pathlib import Path

Path(__file__).with_name("CODE_RAN").write_text("the model directory's code ran")
"""


def save_tiny(path: Path) -> Path:
    """The built-in model's architecture at its smallest, saved like any local model (max_position_embeddings 32)."""
    tokenizer = build_tokenizer()
    build_model(TINY_MODEL, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def with_auto_map(path: Path, model_type: str, file: str = "config.json", **extra: object) -> Path:
    config = json.loads((path / file).read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model",
                          "AutoTokenizer": [None, "custom.Tokenizer"]}  # fmt: skip
    if file == "config.json":
        config["model_type"] = model_type
    config.update(extra)
    (path / file).write_text(json.dumps(config))
    (path / "custom.py").write_text(CUSTOM_CODE)
    return path


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.slow
def test_a_model_that_needs_remote_code_is_refused_without_a_prompt(tmp_path: Path, command: str) -> None:
    model_dir = with_auto_map(save_tiny(tmp_path / "model"), "drgrpo_custom_model")
    args = ["--model", str(model_dir)]
    if command == "train":
        args += ["--output-dir", str(tmp_path / "out"), "--no-progress"]
    # stdin is an open pipe nobody writes to: transformers' [y/N] question would wait on it until the timeout
    p = subprocess.run(
        [sys.executable, "-m", "drgrpo", command, *args],
        stdin=subprocess.PIPE, capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0] == (
        f"drgrpo {command}: error: {model_dir}: needs remote code: config.json has auto_map (its model classes are "
        "Python files in the directory) for model_type 'drgrpo_custom_model', which transformers does not have built "
        "in; drgrpo never runs code from a model directory (no trust_remote_code): use a model transformers supports "
        "natively"
    )
    assert "[y/N]" not in p.stdout + p.stderr
    assert not (model_dir / "CODE_RAN").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_checkpoint_that_needs_remote_code_is_refused_on_resume(tmp_path: Path, capsys) -> None:
    ckpt = with_auto_map(save_tiny(tmp_path / "run" / "checkpoints" / "step_000001"), "drgrpo_custom_model")
    state = {"step": 1, "train_config": TrainConfig(output_dir=str(tmp_path / "run")).to_dict(), "init_model": ""}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    torch.save(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]).state_dict(), ckpt / "optimizer.pt")  # whole
    line = refused(capsys, "--resume", str(tmp_path / "run"))
    assert f"{ckpt}: needs remote code: config.json has auto_map" in line
    assert not (ckpt / "CODE_RAN").exists()


def test_a_custom_tokenizer_class_is_refused(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path / "model")
    with_auto_map(model_dir, "", file="tokenizer_config.json", tokenizer_class="DrgrpoCustomTokenizer")
    (model_dir / "config.json").write_text(
        json.dumps({**json.loads((model_dir / "config.json").read_text()), "model_type": "drgrpo_custom_model"})
    )
    with pytest.raises(ValueError, match=r"needs remote code: tokenizer_config\.json has auto_map \(its tokenizer "
                                         r"class DrgrpoCustomTokenizer is a Python file"):  # fmt: skip
        check_local_code(model_dir)


def test_auto_map_on_a_built_in_model_type_loads_transformers_own_classes(tmp_path: Path) -> None:
    # like trust_remote_code=False: a directory whose model type transformers has built in loads with those
    # classes; its own Python files are never imported
    model_dir = with_auto_map(save_tiny(tmp_path / "model"), "llama")
    model = load_model(model_dir, "float32", device=torch.device("cpu"))
    tokenizer = load_tokenizer(model_dir)
    assert type(model).__module__.startswith("transformers.models.llama")
    assert tokenizer("1 + 1 =")["input_ids"] == build_tokenizer()("1 + 1 =")["input_ids"]
    assert not (model_dir / "CODE_RAN").exists()
