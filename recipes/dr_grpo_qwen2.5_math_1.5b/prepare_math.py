"""MATH levels 3-5 with the Qwen-Math template: the paper's training set, for TRL (JSON lines) and verl (Parquet).

The Dr. GRPO paper (Liu et al. 2025, arXiv 2503.20783) trains on the level 3-5 questions of MATH (Hendrycks et al.
2021); its code (sail-sg/understand-r1-zero, examples/qwen2.5-math-7b.sh) reads them from
``datasets/train/math_lvl3to5_8k``, and its 1.5B script reads ``math_12k``, all levels of the same pool. The pool
is MATH's train and test problems without the 500 test problems of MATH-500, about 12,000; its levels 3-5 are
about 8,500 (the "8k"). This script rebuilds that set from the Hub (or from local copies: any path
``datasets.load_dataset`` reads, e.g. a directory of JSON-lines files):

    python recipes/dr_grpo_qwen2.5_math_1.5b/prepare_math.py --out data/math_lvl3to5
    python prepare_math.py --source path/to/MATH --math500 path/to/MATH-500 --out data/math_lvl3to5

It writes ``OUT/trl/train.jsonl`` and ``OUT/trl/test.jsonl`` (TRL: ``prompt`` as chat messages, ``solution`` as
``\\boxed{answer}`` for TRL's ``accuracy_reward``) and ``OUT/verl/train.parquet``, ``OUT/verl/test.parquet`` (verl:
``data_source``, ``prompt``, ``ability``, ``reward_model.ground_truth``, ``extra_info``). The test split is MATH-500
(the paper reports it among its benchmarks). Each prompt is the Qwen-Math template the paper uses with
Qwen2.5-Math: a system message asking for step-by-step reasoning and a boxed answer, then the question; the
tokenizer's chat template renders it as ``<|im_start|>system ... <|im_end|> <|im_start|>user ...
<|im_end|> <|im_start|>assistant``.
The answer is the last ``\\boxed{...}`` of the reference solution (MATH-500 has an ``answer`` field).

Evaluation, as the paper's: MATH-500 always, and each of AIME 2024, AMC, Minerva Math and OlympiadBench whose
file is given (``--aime2024``, ``--amc``, ``--minerva``, ``--olympiadbench``: any path ``datasets.load_dataset``
reads; its ``test`` split, or its only split). A benchmark row needs a question column (``problem``, ``question``
or ``Problem``) and an answer column (``answer``, ``final_answer`` or ``Answer``; a list of answers is joined with
", ", a whole number written as a float, 142.0, is written 142). ``OUT/trl/test.jsonl`` holds every benchmark's
rows (TRL evaluates one split) with a ``benchmark`` column; ``OUT/verl/test_<benchmark>.parquet`` one file per
benchmark, whose ``data_source`` is the benchmark's name (verl reports validation scores per ``data_source``).

Prompt length: with ``--tokenizer`` (a model name or directory), a prompt whose chat-template rendering (with the
assistant's opening) is longer than ``--max-prompt-length`` tokens (1024, the paper's) is dropped, and the count
of drops per split is printed, as verl's ``data.filter_overlong_prompts`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
"""The Qwen-Math template's system message (sail-sg/understand-r1-zero, train_zero_math.py)."""

LEVELS = ("Level 3", "Level 4", "Level 5")
DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
"""The MATH copy on the Hub that verl's rule reward knows by name (verl.utils.reward_score: math_reward)."""


def last_boxed(solution: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``solution``, braces balanced; None if none."""
    start = max(solution.rfind("\\boxed"), solution.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = solution.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(solution)):
        if solution[i] == "{":
            depth += 1
        elif solution[i] == "}":
            depth -= 1
            if depth == 0:
                return solution[open_at + 1 : i]
    return None


BENCHMARKS = ("math500", "aime2024", "amc", "minerva", "olympiadbench")
"""The paper's evaluation benchmarks, by the names the outputs use."""

QUESTION_COLUMNS = ("problem", "question", "Problem")
ANSWER_COLUMNS = ("answer", "final_answer", "Answer")


def benchmark_rows(name: str, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``examples`` of benchmark ``name`` as ``{"problem", "answer", "level", "benchmark"}`` rows."""
    if not examples:
        return []
    columns = list(examples[0])
    question = next((c for c in QUESTION_COLUMNS if c in columns), None)
    answer = next((c for c in ANSWER_COLUMNS if c in columns), None)
    if question is None or answer is None:
        raise ValueError(
            f"--{name}: got columns {columns}, expected a question column (one of {', '.join(QUESTION_COLUMNS)}) "
            f"and an answer column (one of {', '.join(ANSWER_COLUMNS)})"
        )
    out = []
    for e in examples:
        level = e.get("level")
        out.append(
            {
                "problem": e[question],
                "answer": answer_text(e[answer]),
                "level": f"Level {level}" if isinstance(level, int) else str(level or ""),
                "benchmark": name,
            }
        )
    return out


def answer_text(answer: Any) -> str:
    """An answer as the grader's string: a list joined with ", ", a whole float without its ".0"."""
    if isinstance(answer, (list, tuple)):
        return ", ".join(answer_text(a) for a in answer)
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer)


def messages(problem: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}]


def rows(examples: list[dict[str, Any]], split: str) -> tuple[list[dict], list[dict]]:
    """(TRL rows, verl rows) for ``examples`` with ``problem`` and ``answer``."""
    trl, verl = [], []
    for i, e in enumerate(examples):
        row = {"prompt": messages(e["problem"]), "solution": f"\\boxed{{{e['answer']}}}", "level": e["level"]}
        row["benchmark"] = e.get("benchmark", "math_lvl3to5")  # one set of columns in every split
        trl.append(row)
        verl.append(
            {
                "data_source": e.get("benchmark", DATA_SOURCE),
                "prompt": messages(e["problem"]),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": e["answer"]},
                "extra_info": {"split": split, "index": i, "level": e["level"]},
            }
        )
    return trl, verl


def load_split(path: str) -> list[dict[str, Any]]:
    """The ``test`` split of ``path`` (any path or Hub name ``datasets.load_dataset`` reads), or its only split."""
    from datasets import load_dataset

    splits = load_dataset(path)
    if "test" in splits:
        return [dict(e) for e in splits["test"]]
    if len(splits) == 1:
        return [dict(e) for e in next(iter(splits.values()))]
    raise ValueError(f"{path}: got splits {list(splits)}, expected a 'test' split or a single split")


def build(source: str, math500: str, benchmarks: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, test): MATH train + test without MATH-500, levels 3-5; MATH-500, then the other ``benchmarks``."""
    from datasets import load_dataset

    held_out = load_split(math500)
    exclude = {e["problem"].strip() for e in held_out}
    train = []
    for split in ("train", "test"):
        for e in load_dataset(source, split=split):
            if e["level"] not in LEVELS or e["problem"].strip() in exclude:
                continue
            answer = last_boxed(e["solution"])
            if answer is not None:
                train.append({"problem": e["problem"], "answer": answer, "level": e["level"]})
    test = benchmark_rows("math500", held_out)
    for name, path in (benchmarks or {}).items():
        test += benchmark_rows(name, load_split(path))
    return train, test


def prompt_length(tokenizer: Any, problem: str) -> int:
    """The tokens of ``problem``'s prompt as the model reads it: the chat template, with the assistant's turn."""
    text = tokenizer.apply_chat_template(messages(problem), tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def drop_long(examples: list[dict], tokenizer: Any, limit: int) -> tuple[list[dict], int]:
    """(the examples whose prompt holds at most ``limit`` tokens, the number dropped)."""
    kept = [e for e in examples if prompt_length(tokenizer, e["problem"]) <= limit]
    return kept, len(examples) - len(kept)


def write(out: Path, train: list[dict], test: list[dict]) -> None:
    import pandas as pd

    for sub in ("trl", "verl"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split, examples in (("train", train), ("test", test)):
        trl, verl = rows(examples, split)
        with open(out / "trl" / f"{split}.jsonl", "w") as f:
            for row in trl:
                f.write(json.dumps(row) + "\n")
        if split == "train":
            pd.DataFrame(verl).to_parquet(out / "verl" / "train.parquet")
            continue
        for name in BENCHMARKS:
            rows_of = [r for r in verl if r["data_source"] == name]
            if rows_of:
                pd.DataFrame(rows_of).to_parquet(out / "verl" / f"test_{name}.parquet")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=DATA_SOURCE, help="MATH with train and test splits (problem, level, solution)")
    p.add_argument("--math500", default="HuggingFaceH4/MATH-500", help="MATH-500 (problem, answer, level)")
    for name in BENCHMARKS[1:]:
        p.add_argument(f"--{name}", help=f"{name} (a question and an answer column); left out if not given")
    p.add_argument("--out", default="data/math_lvl3to5", help="output directory")
    p.add_argument("--tokenizer", help="the model's tokenizer; with it, prompts over --max-prompt-length are dropped")
    p.add_argument("--max-prompt-length", type=int, default=1024, help="tokens (the paper's: 1024)")
    args = p.parse_args(argv)
    if args.max_prompt_length < 1:
        p.error(f"--max-prompt-length: got {args.max_prompt_length}, expected a positive number of tokens")
    benchmarks = {n: getattr(args, n) for n in BENCHMARKS[1:] if getattr(args, n)}
    train, test = build(args.source, args.math500, benchmarks)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        train, dropped_train = drop_long(train, tokenizer, args.max_prompt_length)
        test, dropped_test = drop_long(test, tokenizer, args.max_prompt_length)
        print(
            f"dropped {dropped_train} training and {dropped_test} test prompts longer than "
            f"{args.max_prompt_length} tokens"
        )
    write(Path(args.out), train, test)
    counts = ", ".join(f"{n} {sum(e['benchmark'] == n for e in test)}" for n in BENCHMARKS)
    print(f"{len(train)} training questions (levels 3-5), test questions: {counts} -> {args.out}")


if __name__ == "__main__":
    main()
