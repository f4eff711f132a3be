"""What the data checks of ``fused_policy_loss`` cost: ``validate=True`` (the default) against ``validate=False``.

The checks read every row of ``hidden`` at a real token and all of ``weight`` once (their min and max: NaN and
infinity reach both), plus the advantages, old log-probs, mask and target ids; nothing of size (N, V) or (V, H)
is allocated. For each size, forward + backward of the DAPO loss (as benchmarks/fused.py, same inputs) is timed
with and without the checks, alternating A B A B, median of ``--reps``; the checks alone are timed too.

    python benchmarks/fused_checks.py                       # CPU, float32, the sizes of benchmarks/fused.py
    python benchmarks/fused_checks.py --sizes 2048x512x32000 --reps 3 --out /tmp/checks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from drgrpo import LossConfig
from drgrpo.fused import fused_policy_loss
from drgrpo.validation import check_finite_large, check_finite_rows
from fused import DEFAULT_SIZES, make_inputs  # benchmarks/fused.py: the same inputs

ROOT = Path(__file__).resolve().parents[1]


def measure(n: int, h: int, v: int, reps: int) -> dict:
    hidden, weight, target, mask, adv, old = make_inputs(n, h, v, "float32", "cpu")
    config = LossConfig.preset("dapo")

    def step(validate: bool) -> float:
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        fused_policy_loss(hidden, weight, target, mask, adv, config, old_logp=old, validate=validate).loss.backward()
        return time.perf_counter() - t0

    def checks() -> float:
        t0 = time.perf_counter()
        check_finite_rows("hidden", hidden, mask)
        check_finite_large("weight", weight)
        return time.perf_counter() - t0

    step(True), step(False)  # warm-up
    on, off, alone = [], [], []
    for _ in range(reps):
        on.append(step(True))
        off.append(step(False))
        alone.append(checks())
    on_s, off_s = statistics.median(on), statistics.median(off)
    return {"size": f"{n}x{h}x{v}", "validate": on_s, "no_validate": off_s, "ratio": on_s / off_s,
            "checks_alone": statistics.median(alone), "reps": reps}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxHxV (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per mode (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fused-checks-cpu.json"))
    args = parser.parse_args()
    rows = [measure(*map(int, size.split("x")), args.reps) for size in args.sizes.split(",")]
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "date": time.strftime("%Y-%m-%d"), "load_average": list(os.getloadavg())}  # fmt: skip
    Path(args.out).write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print("| N x H x V | validate=True | validate=False | ratio | checks alone |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['validate']:.3f} s | {r['no_validate']:.3f} s | {r['ratio']:.3f} | "
              f"{r['checks_alone'] * 1000:.1f} ms |")  # fmt: skip
    print(f"({info['date']}, torch {info['torch']}, {info['threads']} threads, load average {info['load_average']})")


if __name__ == "__main__":
    main()
