"""The built-in task, reward, tokenizer and data loading, against hand-written cases."""

from __future__ import annotations

import json
import math

import pytest

from drgrpo.train.loop.data import RewardError, Rewards, call_reward, load_jsonl, load_reward
from drgrpo.train.loop.rollout import completion_mask, prompt_texts, truncated_rows
from drgrpo.train.loop.task import TaskConfig, count_work, exact_match, format_completion, make_splits, parse_answer
from drgrpo.train.loop.tiny import VOCAB, build_tokenizer

# --------------------------------------------------------------------------- reward: hand cases


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("4 2", "42", 1.0),
        (". . 4 2", "42", 1.0),  # working tokens before the answer are free
        (". . . . 4 2", "42", 1.0),
        ("42", "42", 1.0),  # one multi-digit token reads the same
        ("4 3", "42", 0.0),
        ("0 4 2", "42", 0.0),  # a leading zero is a different string
        ("4 . 2", "42", 0.0),  # working tokens never inside the answer
        ("4 2 . .", "42", 1.0),  # ... or after it
        (". 4 2 .", "42", 1.0),
        (". .", "42", 0.0),  # no answer
        ("", "42", 0.0),
        ("4 2 +", "42", 0.0),
        ("0", "0", 1.0),
        ("1 0 0", "100", 1.0),
    ],
)
def test_exact_match_hand_cases(completion: str, answer: str, expected: float) -> None:
    assert exact_match(completion, {"answer": answer}) == expected


def test_parse_and_count_work() -> None:
    assert parse_answer(". . 1 7") == "17"
    assert parse_answer("x 1") is None
    assert parse_answer("1 7 . .") == "17"
    assert count_work(". . . 1 7") == 3
    assert count_work("1 7 . .") == 2
    assert count_work("1 7") == 0
    assert format_completion("17", 2) == "1 7 . ."
    assert format_completion("17", 2, "before") == ". . 1 7"
    assert format_completion("5", 0) == "5"


# --------------------------------------------------------------------------- splits


def _operands(prompt: str) -> tuple[int, int]:
    left, right = prompt.removesuffix("=").split("+")
    return int(left.replace(" ", "")), int(right.replace(" ", ""))


def test_splits_are_disjoint_complete_and_correct() -> None:
    cfg = TaskConfig(max_operand=12, num_eval=30, seed=5)
    train, held = make_splits(cfg)
    assert len(held) == 30
    assert len(train) + len(held) == 13 * 13
    train_pairs = {(e["a"], e["b"]) for e in train}
    held_pairs = {(e["a"], e["b"]) for e in held}
    assert not train_pairs & held_pairs
    assert train_pairs | held_pairs == {(a, b) for a in range(13) for b in range(13)}
    for e in train + held:
        a, b = _operands(e["prompt"])  # read back from the text, not from the stored fields
        assert e["answer"] == str(a + b)
    # the same seed gives the same split; another seed another one
    assert make_splits(cfg)[1] == held
    assert make_splits(TaskConfig(max_operand=12, num_eval=30, seed=6))[1] != held


def test_prompts_have_constant_token_length() -> None:
    tok = build_tokenizer()
    train, held = make_splits(TaskConfig(max_operand=49, num_eval=10))
    lengths = {len(tok(e["prompt"])["input_ids"]) for e in train + held}
    assert lengths == {6}  # "d d + d d ="


def test_task_config_validation() -> None:
    with pytest.raises(ValueError, match="num_eval"):
        TaskConfig(max_operand=3, num_eval=16)
    with pytest.raises(ValueError, match="max_operand"):
        TaskConfig(max_operand=0)
    with pytest.raises(ValueError, match="work_position"):
        TaskConfig(work_position="middle")


# --------------------------------------------------------------------------- tokenizer and masks


def test_tokenizer_round_trip() -> None:
    tok = build_tokenizer()
    assert len(tok) == len(VOCAB)
    ids = tok("3 7 + 0 5 = . . 4 2")["input_ids"]
    assert [VOCAB[i] for i in ids] == ["3", "7", "+", "0", "5", "=", ".", ".", "4", "2"]
    assert tok.decode([*ids, tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "3 7 + 0 5 = . . 4 2"
    assert tok.unk_token_id == VOCAB.index("<unk>")
    assert tok("7 x")["input_ids"][1] == tok.unk_token_id


def test_completion_mask_keeps_first_eos() -> None:
    import torch

    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, eos, pad], [5, eos, 7, eos], [5, 6, 7, 8]])
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(completion_mask(ids, [eos]), expected)
    # only the last row never ended: the budget cut it off
    assert truncated_rows(ids, [eos]).tolist() == [False, False, True]
    # a second end-of-sequence id counts too (generation configs often list several)
    assert truncated_rows(ids, [eos, 8]).tolist() == [False, False, False]


def test_prompt_texts_uses_chat_template() -> None:
    tok = build_tokenizer()
    assert prompt_texts(["1 + 2 ="], tok) == ["1 + 2 ="]
    tok.chat_template = (
        "{% for m in messages %}<bos> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ={% endif %}"
    )
    assert prompt_texts(["1 + 2"], tok) == ["<bos> 1 + 2 ="]
    assert prompt_texts([[{"role": "user", "content": "3 + 4"}]], tok) == ["<bos> 3 + 4 ="]


# --------------------------------------------------------------------------- rewards and datasets


def _raises(completion: str, example: dict) -> float:
    raise KeyError("solution")


def test_reward_errors_name_the_example() -> None:
    ex = {"prompt": "1 + 1 =", "answer": "2"}
    with pytest.raises(RewardError, match=r"raised KeyError.*example #17 .*1 \+ 1 ="):
        call_reward("mod:f", _raises, "2", ex, 17)
    with pytest.raises(RewardError, match=r"not finite.*example #3"):
        call_reward("mod:f", lambda c, e: math.nan, "2", ex, 3)
    with pytest.raises(RewardError, match=r"returned 'yes' \(str\)"):
        call_reward("mod:f", lambda c, e: "yes", "2", ex, 0)
    with pytest.raises(RewardError, match=r"returned None"):
        call_reward("mod:f", lambda c, e: None, "2", ex, 0)
    assert call_reward("mod:f", lambda c, e: 1, "2", ex, 0) == 1.0


def test_weighted_rewards() -> None:
    rewards = Rewards(("exact", "work"), (exact_match, lambda c, e: count_work(c)), (2.0, 0.5))
    exs = [{"answer": "42"}, {"answer": "42"}]
    totals, firsts = rewards([". . 4 2", "4 3"], exs, [0, 1])
    assert firsts == [1.0, 0.0]
    assert totals == [2.0 * 1 + 0.5 * 2, 0.0]  # correct with 2 working tokens; wrong with none


def test_default_reward_is_exact_match() -> None:
    rewards = Rewards.from_specs([])
    assert rewards.fns == (exact_match,) and rewards.weights == (1.0,)
    with pytest.raises(ValueError, match="one weight per reward"):
        Rewards.from_specs(["drgrpo.train.loop.task:exact_match"], [1.0, 2.0])


def test_load_reward_errors() -> None:
    assert load_reward("drgrpo.train.loop.task:exact_match") is exact_match
    # the name before train/ was split into packages, which a saved config.yaml may hold, loads the same function
    assert load_reward("drgrpo.train.task:exact_match") is exact_match
    with pytest.raises(ValueError, match="module:function"):
        load_reward("exact_match")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        load_reward("drgrpo.train.loop.task:nope")


def test_load_jsonl_errors(tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n\n")
    assert load_jsonl(good) == [{"prompt": "1 + 1 =", "answer": "2"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 + 1 ="}) + "\n" + json.dumps({"question": "2 + 2 ="}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'prompt' field \(fields: \['question'\]\)"):
        load_jsonl(bad)
    assert load_jsonl(bad.parent / "good.jsonl", "prompt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    notjson = tmp_path / "x.jsonl"
    notjson.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: not valid JSON"):
        load_jsonl(notjson)
