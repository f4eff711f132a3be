"""The length-bias task variant (``TaskConfig.answer_noise``): warm-start data with a wrong last digit."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from drgrpo.train.loop.task import (
    TaskConfig,
    corrupt_last_digit,
    exact_match,
    format_completion,
    make_splits,
    sft_pairs,
)


def test_no_noise_reproduces_the_original_warm_start_data():
    # the data as the warm start drew them before the variant existed: an example, then a working length
    task = TaskConfig()
    train, _ = make_splits(task)
    rng = random.Random(7)
    expected = []
    for _ in range(200):
        ex = train[rng.randrange(len(train))]
        expected.append((ex["prompt"], format_completion(ex["answer"], rng.randint(0, task.max_work))))
    assert list(itertools.islice(sft_pairs(train, task, random.Random(7)), 200)) == expected


@pytest.mark.parametrize("kind", ["digit", "symbol"])
def test_noise_replaces_the_last_digit_at_the_stated_rate(kind):
    task = TaskConfig(answer_noise=0.3, max_work=4, noise_kind=kind)
    train, _ = make_splits(task)
    answers = {ex["prompt"]: ex["answer"] for ex in train}
    n = 20000
    wrong, replaced_by, work_wrong, work_right = 0, Counter(), Counter(), Counter()
    for prompt, completion in itertools.islice(sft_pairs(train, task, random.Random(0)), n):
        tokens = completion.split()
        work = tokens.count(".")
        given = tokens[: len(tokens) - work]
        true = list(answers[prompt])
        assert tokens[len(given) :] == ["."] * work  # working tokens after the answer, as before
        assert given[:-1] == true[:-1]  # only the last digit ever changes
        if given != true:
            wrong += 1
            replaced_by[(true[-1], given[-1])] += 1
            work_wrong[work] += 1
            assert exact_match(completion, {"answer": answers[prompt]}) == 0.0
        else:
            work_right[work] += 1
    se = math.sqrt(0.3 * 0.7 / n)
    assert abs(wrong / n - 0.3) < 4 * se
    if kind == "symbol":
        assert {new for _, new in replaced_by} == {"-"}
    else:
        assert all(old != new and new.isdigit() for old, new in replaced_by)
        # each of the 9 other digits about equally often: 9 * 10 (old, new) cells, ~67 each
        per_new = Counter(new for (_, new), count in replaced_by.items() for _ in range(count))
        assert len(per_new) == 10 and max(per_new.values()) / min(per_new.values()) < 1.3
    # the working length does not depend on the noise: uniform 0..4 in both groups
    for counts in (work_wrong, work_right):
        total = sum(counts.values())
        assert sorted(counts) == [0, 1, 2, 3, 4]
        assert all(abs(c / total - 0.2) < 4 * math.sqrt(0.2 * 0.8 / total) for c in counts.values())


def test_corrupt_last_digit_by_hand():
    rng = random.Random(0)
    assert corrupt_last_digit("42", rng, "symbol") == "4-"
    got = {corrupt_last_digit("42", rng) for _ in range(500)}
    assert got == {f"4{d}" for d in "013456789"}
    assert {corrupt_last_digit("7", rng) for _ in range(500)} == set("012345689")


def test_bad_noise_settings_name_the_field():
    with pytest.raises(ValueError, match=r"answer_noise must be in \[0, 0\.9\) for noise_kind 'digit'.*got 0\.95"):
        TaskConfig(answer_noise=0.95)
    with pytest.raises(ValueError, match=r"answer_noise must be in \[0, 0\.9\).*got -0\.1"):
        TaskConfig(answer_noise=-0.1)
    with pytest.raises(ValueError, match=r"answer_noise must be in \[0, 0\.5\) for noise_kind 'symbol'.*got 0\.6"):
        TaskConfig(answer_noise=0.6, noise_kind="symbol")
    assert TaskConfig(answer_noise=0.6).answer_noise == 0.6  # 0.6 / 9 per wrong digit: the right one still leads
    with pytest.raises(ValueError, match="noise_kind must be 'digit' or 'symbol', got 'letter'"):
        TaskConfig(noise_kind="letter")


@pytest.mark.slow
def test_compare_flags_reach_the_task_and_the_warm_start():
    from drgrpo.train.cli.main import build_parser, compare_config_from_args
    from drgrpo.train.train_config import WarmStartConfig

    flags = ["--task-answer-noise", "0.3", "--task-noise-kind", "symbol", "--warm-start-target-accuracy", "0.9"]
    args = build_parser().parse_args(["compare", *flags, "--task-max-work", "8", "--warm-start-steps", "3000"])
    train = compare_config_from_args(args).train
    assert train.task == TaskConfig(answer_noise=0.3, noise_kind="symbol", max_work=8)
    assert train.warm_start == WarmStartConfig(steps=3000, target_accuracy=0.9)
    args = build_parser().parse_args(["compare", "--warm-start-target-accuracy", "0.5"])
    train = compare_config_from_args(args).train
    assert train.warm_start == WarmStartConfig(target_accuracy=0.5) and train.task == TaskConfig()


def test_compare_help_points_to_the_variant(capsys):
    from drgrpo.train.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--task-answer-noise 0.3 --warm-start-target-accuracy 0.9" in text
    assert "--task-noise-kind symbol" in text and "docs/length-bias.md" in text
