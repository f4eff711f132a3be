"""What the entropy mask and bonus cost in the fused pass: ``fused_policy_loss`` as today (no entropy) against the
same call with the bonus, the mask with a given (per-step) threshold plus the bonus, and the mask with its
per-call threshold (a first pass over the chunks).

One process, the variants interleaved (A B C D A B C D ...), each call a forward + backward of the DAPO loss with
``old_logp`` (the inputs of ``benchmarks/fused.py``); the median wall and CPU time (``time.process_time``) per
variant, and their ratios to today's pass.

    python benchmarks/fused_entropy_terms.py --size 1024x64x32000 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from fused import machine, make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1024x64x32000", help="NxHxV (N = 8 rows x N/8 tokens)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per variant (interleaved)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from drgrpo import LossConfig
    from drgrpo.entropy import entropy_threshold
    from drgrpo.fused import fused_policy_loss

    n, h, v = (int(x) for x in args.size.split("x"))
    hidden, weight, target, mask, adv, old = make_inputs(n, h, v, "float32", "cpu")
    base = LossConfig.preset("dapo")
    with torch.no_grad():
        ent = fused_policy_loss(hidden, weight, target, mask, adv, base, old_logp=old, compute_entropy=True).entropy
        tau = entropy_threshold(ent, mask, 0.2)
    variants = {
        "today (no entropy)": (base, None),
        "bonus (entropy_coef 0.01)": (base.replace(entropy_coef=0.01), None),
        "mask q = 0.2, given threshold, + bonus": (base.replace(top_entropy_quantile=0.2, entropy_coef=0.01), tau),
        "mask q = 0.2, per-call threshold": (base.replace(top_entropy_quantile=0.2), None),
    }

    def call(config, threshold) -> tuple[float, float]:
        hidden.grad = weight.grad = None
        wall, cpu = time.perf_counter(), time.process_time()
        out = fused_policy_loss(hidden, weight, target, mask, adv, config, old_logp=old, entropy_threshold=threshold)
        out.loss.backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    for config, threshold in variants.values():  # warm-up
        call(config, threshold)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, (config, threshold) in variants.items():
            times[name].append(call(config, threshold))
    w0 = statistics.median(t[0] for t in times["today (no entropy)"])
    c0 = statistics.median(t[1] for t in times["today (no entropy)"])
    print(f"{machine()}; N x H x V = {args.size}; {args.threads} thread(s); median of {args.reps}")
    print("| variant | wall (s) | CPU (s) | x wall | x CPU |\n|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        w, c = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"| {name} | {w:.2f} | {c:.2f} | {w / w0:.3f} | {c / c0:.3f} |")


if __name__ == "__main__":
    main()
