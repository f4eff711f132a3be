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


def messages(problem: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}]


def rows(examples: list[dict[str, Any]], split: str) -> tuple[list[dict], list[dict]]:
    """(TRL rows, verl rows) for ``examples`` with ``problem`` and ``answer``."""
    trl, verl = [], []
    for i, e in enumerate(examples):
        trl.append({"prompt": messages(e["problem"]), "solution": f"\\boxed{{{e['answer']}}}", "level": e["level"]})
        verl.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": messages(e["problem"]),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": e["answer"]},
                "extra_info": {"split": split, "index": i, "level": e["level"]},
            }
        )
    return trl, verl


def build(source: str, math500: str) -> tuple[list[dict], list[dict]]:
    """(train, test): MATH train + test without MATH-500, levels 3-5; and MATH-500."""
    from datasets import load_dataset

    held_out = [dict(e) for e in load_dataset(math500, split="test")]
    exclude = {e["problem"].strip() for e in held_out}
    train = []
    for split in ("train", "test"):
        for e in load_dataset(source, split=split):
            if e["level"] not in LEVELS or e["problem"].strip() in exclude:
                continue
            answer = last_boxed(e["solution"])
            if answer is not None:
                train.append({"problem": e["problem"], "answer": answer, "level": e["level"]})
    test = [{"problem": e["problem"], "answer": e["answer"], "level": f"Level {e['level']}"} for e in held_out]
    return train, test


def write(out: Path, train: list[dict], test: list[dict]) -> None:
    import pandas as pd

    for sub in ("trl", "verl"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split, examples in (("train", train), ("test", test)):
        trl, verl = rows(examples, split)
        with open(out / "trl" / f"{split}.jsonl", "w") as f:
            for row in trl:
                f.write(json.dumps(row) + "\n")
        pd.DataFrame(verl).to_parquet(out / "verl" / f"{split}.parquet")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=DATA_SOURCE, help="MATH with train and test splits (problem, level, solution)")
    p.add_argument("--math500", default="HuggingFaceH4/MATH-500", help="MATH-500 (problem, answer, level)")
    p.add_argument("--out", default="data/math_lvl3to5", help="output directory")
    args = p.parse_args(argv)
    train, test = build(args.source, args.math500)
    write(Path(args.out), train, test)
    print(f"{len(train)} training questions (levels 3-5), {len(test)} test questions -> {args.out}")


if __name__ == "__main__":
    main()
