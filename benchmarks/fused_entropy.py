"""What TRL's ``entropy`` metric costs in the fused pass: ``fused_policy_loss`` with and without ``compute_entropy``.

One process per size; the two variants interleaved A B A B (each call a forward + backward of the DAPO loss with
``old_logp``, the inputs of ``benchmarks/fused.py``). Reported per variant: the median wall time and the median
CPU time (``time.process_time``: every thread of this process, the work done, which other load on a shared machine
changes far less than the wall time, with one thread by default so that no thread spins waiting for another), and
the ratios with / without entropy.

    python benchmarks/fused_entropy.py                    # writes benchmarks/results/fused-entropy-cpu.md
    python benchmarks/fused_entropy.py --sizes 512x64x32000 --reps 2 --out /tmp/entropy.md   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fused import machine, make_inputs

DEFAULT_SIZES = "1024x64x151936,1024x128x151936,1024x512x151936,512x1536x151936"
ROOT = Path(__file__).resolve().parents[1]


def worker(n: int, h: int, v: int, reps: int, dtype: str, device: str, threads: int) -> dict:
    """Interleaved timed calls without and with entropy; the entropy check against the full logits."""
    import torch

    torch.set_num_threads(threads)

    from drgrpo import LossConfig
    from drgrpo.fused import fused_policy_loss

    hidden, weight, target, mask, adv, old = make_inputs(n, h, v, dtype, device)
    config = LossConfig.preset("dapo")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(entropy: bool) -> tuple[float, float]:
        hidden.grad = weight.grad = None
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fused_policy_loss(hidden, weight, target, mask, adv, config, old_logp=old, compute_entropy=entropy)
        out.loss.backward()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    call(False), call(True)  # warm-up
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(reps):
        for entropy in (False, True):
            times[entropy].append(call(entropy))
    with torch.no_grad():  # the first row's entropy against the full logits in float64
        out = fused_policy_loss(hidden, weight, target, mask, adv, config, old_logp=old, compute_entropy=True)
        z = hidden[0].double() @ weight.double().T
        want = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
        error = float(((out.entropy[0].double() - want).abs() / want.abs()).max())

    def median(entropy: bool, k: int) -> float:
        return statistics.median(t[k] for t in times[entropy])

    return {
        "wall": [median(False, 0), median(True, 0)],
        "cpu": [median(False, 1), median(True, 1)],
        "entropy_rel_error": error,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxHxV (N = 8 rows x N/8 tokens)")
    p.add_argument("--reps", type=int, default=4, help="timed calls per variant (interleaved)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU time is the work, no spinning)")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/fused-entropy-<device>.md)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        n, h, v = (int(x) for x in args.worker.split("x"))
        print(json.dumps(worker(n, h, v, args.reps, args.dtype, args.device, args.threads)))
        return

    header = machine()
    rows = [
        "| N x H x V | without entropy: wall / CPU (s) | with entropy: wall / CPU (s) | x wall | x CPU "
        "| entropy vs float64 logits |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size in args.sizes.split(","):
        cmd = [sys.executable, __file__, "--worker", size, "--reps", str(args.reps)]
        cmd += ["--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        (w0, w1), (c0, c1) = r["wall"], r["cpu"]
        rows.append(
            f"| {size.replace('x', ' x ')} | {w0:.2f} / {c0:.2f} | {w1:.2f} / {c1:.2f} | {w1 / w0:.3f} "
            f"| {c1 / c0:.3f} | {r['entropy_rel_error']:.1e} |"
        )
        print(rows[-1], flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"fused-entropy-{args.device}.md"
    command = (
        f"python benchmarks/fused_entropy.py --sizes {args.sizes} --reps {args.reps} --dtype {args.dtype} "
        f"--threads {args.threads}"
    )
    out.write_text(
        f"# The entropy metric in the fused pass ({args.device}, {args.dtype})\n\n"
        f"Machine: {header}. Command: `{command}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
        f"Forward + backward of `fused_policy_loss` (DAPO loss, old_logp given), without and with "
        f"`compute_entropy=True`, interleaved, median of {args.reps} calls each, {args.threads} thread(s); CPU "
        "time is the process's. Last column: the largest relative difference of the first row's entropies from a "
        "float64 computation on the full logits.\n\n" + "\n".join(rows) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
