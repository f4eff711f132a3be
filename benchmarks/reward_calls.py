"""Reward throughput: completions scored per second by the trainer's reward call (``Rewards``), in one process.

Three rewards, each on the built-in task's examples and completions that are right half the time:

- ``constant``: returns 1.0 (what the trainer's call costs by itself, as microseconds a call);
- ``exact_match``: the built-in task's reward (a few microseconds a call: the trainer's own cost dominates);
- ``sleep_10ms``: exact match after a 10 ms sleep (a reward that waits on something: the trainer's cost vanishes).

Each is timed over ``--calls`` completions, after a warm-up, and reported as calls per second. With ``--src DIR``
the script runs the package in DIR instead of the installed one (a checkout before a change), so two runs give a
before/after ratio:

    python benchmarks/reward_calls.py                              # the installed drgrpo
    python benchmarks/reward_calls.py --src ../old-checkout/src    # another source tree, the same measurement
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def sleep_10ms(completion: str, example: dict) -> float:
    """Exact match after a 10 ms sleep."""
    from drgrpo.train.loop.task import exact_match

    time.sleep(0.01)
    return exact_match(completion, example)


def constant(completion: str, example: dict) -> float:
    """1.0, whatever the completion."""
    return 1.0


def measure(fn_name: str, calls: int) -> float:
    """Calls per second of ``Rewards.__call__`` on ``calls`` completions (one batch, as a step scores them)."""
    from drgrpo.train.loop.data import Rewards
    from drgrpo.train.loop.task import TaskConfig, exact_match, make_splits

    examples = make_splits(TaskConfig())[0][:calls]
    examples = (examples * (calls // len(examples) + 1))[:calls]
    completions = [e["answer"] if i % 2 else "0" for i, e in enumerate(examples)]
    fn = {"constant": constant, "exact_match": exact_match, "sleep_10ms": sleep_10ms}[fn_name]
    rewards = Rewards((f"bench:{fn_name}",), (fn,), (1.0,))
    rewards(completions[:10], examples[:10], list(range(10)))  # warm-up
    started = time.perf_counter()
    rewards(completions, examples, list(range(calls)))
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="completions scored by exact_match (default 20000)")
    parser.add_argument("--sleep-calls", type=int, default=200, help="completions scored by sleep_10ms (default 200)")
    parser.add_argument("--src", default=None, help="a source tree to import drgrpo from instead of the installed one")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON to this file")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    import drgrpo

    figures = {
        "source": str(Path(drgrpo.__file__).parent),
        "constant_us_per_call": min(1e6 / measure("constant", args.calls) for _ in range(3)),
        "exact_match_calls_per_s": measure("exact_match", args.calls),
        "sleep_10ms_calls_per_s": measure("sleep_10ms", args.sleep_calls),
    }
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
