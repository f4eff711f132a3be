"""drgrpo compare's warm start against drgrpo train's: the same command line's warm start, timed in fresh processes.

Both commands build the built-in tiny model and warm-start it with the same settings before any RL. Each
repetition runs, in a fresh process and in turn (A B A B ...), the warm start of

- ``train``: ``drgrpo train --steps 1`` (only its warm start is timed, from the line it logs);
- ``compare``: ``drgrpo compare --losses dr_grpo --seeds 1 --steps 1 --jobs 1`` (the same);

with ``--src DIR`` the commands run the package in DIR instead of the installed one (for a before/after figure:
``--src`` pointing at a checkout before the fix). It reports the median warm-start time of each and whether the two
warm-started models are bitwise identical. Before the fix, compare ran its warm start with torch's default thread
count (one per core) and train with one thread (``TrainConfig.apply_torch_settings``); on a busy 2-core machine the
spinning threads made compare's warm start 10 to 15 times slower, with the same weights.

    python benchmarks/warm_start.py --out runs/warm-start.md            # 2 repetitions of each
    python benchmarks/warm_start.py --src ../old-checkout/src --reps 1  # the same with another source tree
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "train": ["train", "--steps", "1", "--eval-size", "8"],
    "compare": ["compare", "--losses", "dr_grpo", "--seeds", "1", "--steps", "1", "--jobs", "1", "--eval-size", "8"],
}
"""The two commands (after ``drgrpo``); each also gets ``--output-dir``."""
WARM_START_FILE = "warm_start/model.safetensors"


def run_once(command: str, out_dir: Path, src: str | None, extra: list[str]) -> float:
    """Run one command in a fresh process; the warm start's seconds, read from its warm_start.json."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "drgrpo", *COMMANDS[command], *extra, "--output-dir", str(out_dir)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[2:])} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    marker = json.loads((out_dir / "warm_start" / "warm_start.json").read_text())
    return float(marker["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="fresh processes per command (default: 2)")
    parser.add_argument("--warm-start-steps", type=int, default=None, help="at most this many supervised steps")
    parser.add_argument("--src", default=None, help="a source tree to run instead of the installed drgrpo")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    load_before, started = os.getloadavg()[0], time.time()
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name in COMMANDS:
                extra = ["--warm-start-steps", str(args.warm_start_steps)] if args.warm_start_steps else []
                seconds[name].append(run_once(name, Path(tmp) / f"{name}{rep}", args.src, extra))
                print(f"{name} #{rep}: warm start {seconds[name][-1]:.1f} s", flush=True)
        same = filecmp.cmp(Path(tmp) / "train0" / WARM_START_FILE, Path(tmp) / "compare0" / WARM_START_FILE, False)
    train_s, compare_s = statistics.median(seconds["train"]), statistics.median(seconds["compare"])
    source = f"the source tree {_commit(args.src)}" if args.src else "the installed drgrpo"
    text = "\n".join(
        [
            f"Warm start of the built-in model, median of {args.reps} fresh process(es) each, {source}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, load average {load_before:.1f} -> "
            f"{os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs. Command: `python benchmarks/warm_start.py"
            + (" --src SRC" if args.src else "")
            + (f" --warm-start-steps {args.warm_start_steps}" if args.warm_start_steps else "")
            + f" --reps {args.reps}`.",
            "",
            "| command | warm start | x train |",
            "|---|---:|---:|",
            f"| `drgrpo train` | {train_s:.1f} s | 1.00 |",
            f"| `drgrpo compare` | {compare_s:.1f} s | {compare_s / train_s:.2f} |",
            "",
            f"Warm-started weights bitwise identical: {'yes' if same else 'no'}.",
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def _commit(src: str) -> str:
    """``at commit <hash>`` of the git checkout holding ``src`` (its path would name this machine's folders)."""
    proc = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"at commit {proc.stdout.strip()}" if proc.returncode == 0 else "(not a git checkout)"


if __name__ == "__main__":
    main()
