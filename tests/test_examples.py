"""examples/: the data, the rewards and the config file of "your own model, data and rewards" (docs/training.md).

The commands themselves run in tests/test_docs.py (the page's block: make the model, train, evaluate, resume,
rerun from the config file); here their inputs are checked against values derived independently.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def rewards():
    # loaded from its file: another test may have imported a different module named my_rewards
    spec = importlib.util.spec_from_file_location("examples_my_rewards", EXAMPLES / "my_rewards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_answer_is_the_difference_its_prompt_asks_for():
    for name, size in (("train.jsonl", 200), ("eval.jsonl", 50)):
        lines = (EXAMPLES / "data" / name).read_text().splitlines()
        assert len(lines) == size
        for line in lines:
            example = json.loads(line)
            assert re.fullmatch(r"\d \d - \d \d =", example["prompt"]), example["prompt"]
            digits = [int(d) for d in re.findall(r"\d", example["prompt"])]
            a, b = 10 * digits[0] + digits[1], 10 * digits[2] + digits[3]
            assert example["answer"] == str(a - b) and a >= b
    train = {json.loads(x)["prompt"] for x in (EXAMPLES / "data" / "train.jsonl").read_text().splitlines()}
    held_out = {json.loads(x)["prompt"] for x in (EXAMPLES / "data" / "eval.jsonl").read_text().splitlines()}
    assert not train & held_out  # the held-out prompts are unseen


def test_the_rewards_by_hand(rewards):
    example = {"prompt": "7 3 - 2 5 =", "answer": "48"}
    assert rewards.correct("4 8", example) == 1.0
    assert rewards.correct("48", example) == 1.0
    assert rewards.correct("4 9", example) == 0.0
    assert rewards.correct("4 8 .", example) == 0.0
    assert rewards.digits_only("4 9", example) == 1.0
    assert rewards.digits_only("4 .", example) == 0.0
    assert rewards.digits_only("", example) == 0.0
    assert rewards.digits_only("1 2 3 4", example) == 0.0


def test_the_config_file_is_the_documented_command():
    from drgrpo.train.cli.main import build_parser, train_config_from_args
    from drgrpo.train.flags import parse_with_config

    page = (ROOT / "docs" / "training.md").read_text()
    command = re.search(r"^(drgrpo train --model runs/my-model .*?)$", page.replace("\\\n", " "), re.M).group(1)
    argv = shlex.split(command)[1:]
    from_command = train_config_from_args(parse_with_config(build_parser(), argv))
    from_file = train_config_from_args(
        parse_with_config(build_parser(), ["train", "--config", str(EXAMPLES / "my-run.yaml")])
    )
    assert from_file == from_command
    assert from_file.rewards == ("my_rewards:correct", "my_rewards:digits_only")
    assert from_file.loss_config().beta == 0.0 and from_file.loss_config().max_completion_length == 4


def test_make_model_writes_a_model_directory_the_trainer_loads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from make_model import make_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_model(tmp_path / "my-model", seed=3)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the shape make_model.py states: 2 layers, H = 64
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    # every prompt of the data is in the tokenizer's vocabulary
    prompts = [json.loads(x)["prompt"] for x in (EXAMPLES / "data" / "train.jsonl").read_text().splitlines()]
    assert tokenizer.unk_token_id not in {i for p in prompts for i in tokenizer(p)["input_ids"]}
    sys.modules.pop("make_model", None)
