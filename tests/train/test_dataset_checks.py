"""Two dataset checks before any work: the answer field the default reward reads, the built-in tokenizer's words.

Both used to pass the set-up: a dataset without ``answer`` failed after the first rollout (exit 1), and words the
built-in word-level tokenizer lacks became ``<unk>`` without a word. Each is now a configuration error (exit 2, one
line naming the file) before the warm start; the expected lines are written out here by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drgrpo.train.cli.main import main
from drgrpo.train.loop.setup import prompt_check
from drgrpo.train.loop.tiny import TinyModelConfig, build_model, build_tokenizer
from drgrpo.train.train_config import TrainConfig

ANSWER_LINE = (
    "example #{i} has no 'answer' field, which the default reward (drgrpo.train.loop.task:exact_match) reads; add it "
    "to every line or give --reward MODULE:FUNCTION"
)


def lines(path: Path, *examples: dict) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def refused(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> str:
    assert main(["train", "--output-dir", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert not out.exists()  # refused before the output directory, the warm start or a rollout
    return err.rstrip("\n")


@pytest.mark.parametrize("flag", ["--dataset", "--eval-dataset"])
def test_no_answer_field_without_a_reward_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    data = lines(tmp_path / "d.jsonl", {"prompt": "1 + 1 =", "answer": "2"}, {"prompt": "2 + 2 =", "solution": "4"})
    line = refused(capsys, tmp_path / "out", flag, str(data))
    assert line == f"drgrpo train: error: {flag} '{data}': {ANSWER_LINE.format(i=1)}"


def test_a_reward_of_ones_own_needs_no_answer_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # with --reward the fields are the reward's business: the set-up goes on to the next check (here --device)
    data = lines(tmp_path / "d.jsonl", {"prompt": "1 + 1 =", "solution": "2"})
    line = refused(capsys, tmp_path / "out", "--dataset", str(data), "--reward", "drgrpo.train.loop.task:exact_match",
                   "--device", "nope")  # fmt: skip
    assert line == "drgrpo train: error: --device 'nope' is not a torch device; expected cpu, cuda, cuda:1, mps, ..."


def test_words_the_built_in_tokenizer_lacks_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = lines(tmp_path / "d.jsonl", {"prompt": "1 + 1 =", "answer": "2"},
                 {"prompt": "what is 1+1 ? 2 = 2", "answer": "2"})  # fmt: skip
    line = refused(capsys, tmp_path / "out", "--dataset", str(data))
    assert line == (
        f"drgrpo train: error: {data}:2: words outside the built-in tokenizer's vocabulary: '1+1', '?', 'is', 'what' "
        "(it knows 0-9 + - = . only, space-separated); give --model a model directory with its own tokenizer"
    )


def test_a_checkpoint_of_the_built_in_model_checks_its_words_and_another_tokenizer_does_not(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    model = build_model(TinyModelConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16), tokenizer)
    model.save_pretrained(tmp_path / "built_in")
    tokenizer.save_pretrained(tmp_path / "built_in")
    check = prompt_check(tmp_path / "built_in", TrainConfig(max_new_tokens=4))
    assert check("1 + 1 =") is None
    assert check("one + 1 =") == (
        "words outside the built-in tokenizer's vocabulary: 'one' (it knows 0-9 + - = . only, space-separated); "
        "give --model a model directory with its own tokenizer"
    )
    # the same model with a tokenizer that knows one more word: a vocabulary of its own, not checked
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *"0123456789", "+", "-", "=", ".", "one"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    check = prompt_check(tmp_path / "other", TrainConfig(max_new_tokens=4))
    assert check.vocabulary is None and check("one + 1 =") is None
