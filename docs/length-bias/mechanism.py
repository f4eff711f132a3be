"""Regenerate the controlled-policy figures and table of docs/length-bias.md (about 30 s on one CPU core).

    python docs/length-bias/mechanism.py --out-dir OUT   # writes mechanism-sees.png, mechanism-blind.png and
                                                         # mechanism-results.md into OUT (created)

The shipped figures and table are docs/length-bias/mechanism-*: ``--out-dir docs/length-bias`` rewrites them.

Trains the controlled policy of ``drgrpo.length_bias`` (an answer, then a stop/continue decision at each
position) with each of the four losses, five seeds each, once with a stop decision that sees correctness
and once with a blind one, and draws the mean length of right and of wrong completions per step, with the
path SGD would take on the hand-derived expected gradient (dashed). Deterministic: the same files every run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from drgrpo.length_bias import (
    ARM_LABELS,
    ARMS,
    MechanismConfig,
    StopPolicy,
    arm_config,
    batch_gradient,
    expected_flow,
    expected_gradient,
    train_policy,
)

SEEDS = 5
WINDOW = 10  # moving average of the per-step batch means in the plots


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing mean of the last ``window`` defined values (NaN steps, with no completion of a kind, are skipped)."""
    out, recent = [], []
    for v in values:
        if not math.isnan(v):
            recent = [*recent, v][-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return np.array(out)


def cell(label: str) -> str:
    """A markdown table cell: the '|' of '1/|o|' escaped."""
    return label.replace("|", "\\|")


def fmt(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def final(values: list[float], fraction: float = 0.1) -> float:
    """Mean over the last ``fraction`` of the steps (defined values only)."""
    tail = [v for v in values[-max(1, int(len(values) * fraction)) :] if not math.isnan(v)]
    return sum(tail) / len(tail) if tail else math.nan


def plot(runs: dict[str, list], flows: dict[str, object], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ARMS), figsize=(13, 3.4), sharey=True)
    for ax, arm in zip(axes, ARMS):
        for key, color, label in (("length_incorrect", "tab:red", "wrong"), ("length_correct", "tab:blue", "right")):
            for k, run in enumerate(runs[arm]):
                ax.plot(
                    smooth(getattr(run, key), WINDOW),
                    color=color,
                    lw=0.7,
                    alpha=0.6,
                    label=f"{label} ({len(runs[arm])} seeds)" if k == 0 else None,
                )
            ax.plot(
                getattr(flows[arm], key),
                color=color,
                lw=1.6,
                ls="--",
                label=f"{label}: expected-gradient path" if arm == ARMS[0] else None,
            )
        ax.set_title(ARM_LABELS[arm], fontsize=10)
        ax.set_xlabel("SGD step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean length (tokens)")
    axes[0].set_ylim(1.5, 14.5)  # the same scale in both figures
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def signal_to_noise(arm: str, batches: int = 400) -> tuple[float, float]:
    """At the initial policy: the expected SGD step of the stop-after-wrong logit and the std of one step."""
    config = MechanismConfig(arm=arm)
    loss_config = arm_config(arm, config.max_length)
    policy = StopPolicy(config.accuracy, config.p_stop, sees_correctness=True)
    generator = torch.Generator().manual_seed(12345)
    steps = []
    for _ in range(batches):
        policy.zero_grad(set_to_none=True)
        correct, num_work = policy.sample(config.groups * config.group_size, config.max_length, generator)
        batch_gradient(policy, correct, num_work, config.group_size, config.max_length, loss_config)
        steps.append(-config.lr * policy.phi.grad[1].item())
    want = expected_gradient(
        policy.theta.item(), policy.phi.detach().numpy(), config.max_length, config.group_size, loss_config
    )
    return -config.lr * float(want.phi[1]), statistics.stdev(steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="directory for the figures and the table")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per loss (default: {SEEDS})")
    parser.add_argument(
        "--steps", type=int, default=MechanismConfig.steps, help="SGD steps per run (default: %(default)s)"
    )
    parser.add_argument(
        "--batches", type=int, default=400, help="sampled batches for the signal and noise (default: 400)"
    )
    args = parser.parse_args()
    for flag, value, least in (("--seeds", args.seeds, 1), ("--steps", args.steps, 1), ("--batches", args.batches, 2)):
        if value < least:  # (a std needs two batches)
            parser.error(f"{flag} must be at least {least}, got {value}")
    out_dir, seeds, steps = args.out_dir, args.seeds, args.steps
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.time()
    lines = [
        "# The controlled policy: results (generated by `python docs/length-bias/mechanism.py --out-dir OUT`)",
        "",
        f"Defaults of `drgrpo.length_bias.MechanismConfig`: {MechanismConfig()}"
        + ("." if steps == MechanismConfig.steps else f", here with steps={steps}."),
        f"{seeds} seeds per arm; 'first' is step 0, 'final' the mean over the last 10% of steps, each cell mean ± std"
        " over seeds of the batch means; 'path' is SGD on the hand-derived expected gradient (no sampling).",
        "",
    ]
    for sees in (True, False):
        runs = {
            arm: [
                train_policy(MechanismConfig(arm=arm, sees_correctness=sees, seed=s, steps=steps)) for s in range(seeds)
            ]
            for arm in ARMS
        }
        flows = {arm: expected_flow(MechanismConfig(arm=arm, sees_correctness=sees, steps=steps)) for arm in ARMS}
        name = "sees" if sees else "blind"
        what = "the stop decision sees correctness" if sees else "the stop decision is blind to correctness"
        plot(
            runs,
            flows,
            f"Controlled policy, {what}: mean length of right and wrong completions",
            out_dir / f"mechanism-{name}.png",
        )
        lines += [
            f"## {what[0].upper() + what[1:]} (`mechanism-{name}.png`)",
            "",
            "| loss | accuracy final | len. right first | len. right final (path) | len. wrong first "
            "| len. wrong final (path) |",
            "|---|---|---|---|---|---|",
        ]
        for arm in ARMS:
            rs, fl = runs[arm], flows[arm]
            lines.append(
                f"| {cell(ARM_LABELS[arm])} | {fmt([final(r.accuracy) for r in rs])} "
                f"| {fmt([r.length_correct[0] for r in rs])} "
                f"| {fmt([final(r.length_correct) for r in rs])} ({fl.length_correct[-1]:.2f}) "
                f"| {fmt([r.length_incorrect[0] for r in rs])} "
                f"| {fmt([final(r.length_incorrect) for r in rs])} ({fl.length_incorrect[-1]:.2f}) |"
            )
        lines.append("")
    lines += [
        "## One step's signal and noise on the stop-after-wrong logit, at the initial policy",
        "",
        f"Expected SGD step (hand-derived) and the std of one step over {args.batches} sampled batches of "
        f"{MechanismConfig().groups} groups x G = {MechanismConfig().group_size} (lr = {MechanismConfig().lr}).",
        "",
        "| loss | expected step | std of one step | expected / std |",
        "|---|---|---|---|",
    ]
    for arm in ARMS:
        mean, std = signal_to_noise(arm, args.batches)
        ratio = f"{abs(mean) / std:.1f}"
        step = f"{mean:+.5f}" if abs(mean) > 1e-12 else "0"
        lines.append(f"| {cell(ARM_LABELS[arm])} | {step} | {std:.5f} | {ratio} |")
    lines += ["", f"Generated in {time.time() - started:.0f} s.", ""]
    (out_dir / "mechanism-results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
