"""``drgrpo compare``: the Dr. GRPO length-bias experiment, GRPO vs Dr. GRPO side by side.

Liu et al. 2025 (arXiv 2503.20783, Fig. 6): under GRPO's per-response ``1/|o_i|`` normalisation a long
incorrect response is penalised less per token than a short one, so incorrect responses grow longer
during training; Dr. GRPO's constant normaliser removes that pull. This module reruns the comparison on
the built-in task: one shared warm start, then one RL run per (loss, seed) with the same seeds and data,
and a report of reward, held-out accuracy and the mean length of correct and of incorrect completions
over steps (mean and spread over seeds).

Both losses get ``beta = 0`` by default (as in the paper's comparison), so the runs differ only in the two
Dr. GRPO modifications: the std division of the advantage and the ``1/|o_i|`` vs ``1/L`` normaliser.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from drgrpo.config import preset_names
from drgrpo.field_error import FieldError, check_finite_fields
from drgrpo.train.config import TrainConfig
from drgrpo.train.metrics import METRICS_FILE, read_metrics_file

PER_RUN = ("output_dir", "loss", "seed", "resume", "progress")
"""TrainConfig fields that compare sets for each run itself (they are not flags of drgrpo compare)."""


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: every loss in ``losses`` trained with every seed, from one warm start."""

    output_dir: str = "runs/compare"
    """Directory of the comparison: warm_start/, runs/LOSS/seedN/ (one run each), report.md and the plots."""
    losses: tuple[str, ...] = ("grpo", "dr_grpo")
    """Loss presets to compare, each trained with every seed (separated by spaces or commas)."""
    seeds: int = 3
    """Seeds per loss: the runs of each loss use seeds 0 to N-1 (prompt order and sampling); the warm start is
    shared."""
    beta: float = 0.0
    """KL coefficient of every loss (0, as in the paper's comparison)."""
    jobs: int = 0
    """Runs in parallel, one CPU thread each; 0: the number of CPU cores, at most 4."""
    window: int = 10
    """Steps in the moving average of the per-step rollout curves."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(progress=False, threads=1), metadata={"prefix": "", "skip": PER_RUN}
    )
    """Every run's TrainConfig (its flags are those of drgrpo train); compare sets output_dir, loss, seed per run.
    With a ``model`` every run starts from that local model instead of the built-in warm start."""
    extra: dict[str, Any] = field(default_factory=dict, metadata={"flag": None, "via": "the Python API"})
    """Free-form notes recorded in the report (e.g. the command line)."""

    def __post_init__(self) -> None:
        check_finite_fields(self)  # --beta nan
        # "grpo,dr_grpo" (one comma-separated flag value) names two presets
        object.__setattr__(
            self, "losses", tuple(n.strip() for item in self.losses for n in item.split(",") if n.strip())
        )
        if not self.losses:
            raise FieldError(CompareConfig, "losses", "losses must name at least one preset, e.g. grpo,dr_grpo")
        unknown = [name for name in self.losses if name not in preset_names()]
        if unknown:
            raise FieldError(
                CompareConfig,
                "losses",
                f"losses: unknown loss preset(s) {', '.join(unknown)}; valid presets: {', '.join(preset_names())}",
            )
        if self.seeds < 1:
            raise FieldError(CompareConfig, "seeds", f"seeds must be >= 1, got {self.seeds}")
        if self.beta < 0:
            raise FieldError(CompareConfig, "beta", f"beta must be >= 0, got {self.beta}")
        if self.jobs < 0:
            raise FieldError(CompareConfig, "jobs", f"jobs must be >= 0, got {self.jobs}")
        if self.window < 1:
            raise FieldError(CompareConfig, "window", f"window must be >= 1, got {self.window}")


def run_dir(out: Path, loss: str, seed: int) -> Path:
    return out / "runs" / loss / f"seed{seed}"


def compare(config: CompareConfig) -> Path:
    """Run every (loss, seed) from one initial policy and write ``report.md`` and plots; returns the report path.

    The initial policy is the built-in warm start, or the local model ``config.train.model`` (a Hugging Face
    model directory, a run or a checkpoint; then with ``config.train``'s ``dataset`` and ``rewards``, if any).
    """
    from drgrpo.train.checkpoint import resolve_model_dir
    from drgrpo.train.warmstart import warm_start

    out = Path(config.output_dir)
    base = config.train.replace(output_dir=str(out))
    base.check_trainable()  # --dtype float16: refused before the warm start
    if base.model is not None:
        base = base.replace(model=str(resolve_model_dir(base.model)))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # ---- one initial policy for every run: a local model, or one warm start (cached: a rerun reuses it)
    # with drgrpo train's torch settings (the tiny model on 1 thread: torch's default of one thread per core
    # made this warm start 10-15 times slower on a busy machine; the weights are the same either way)
    base.apply_torch_settings()
    if base.model is not None:
        init = str(base.model)
    else:
        init = str(out / "warm_start")
        warm_start(init, base.warm_start, base.task, log=print)

    # ---- one RL run per (loss, seed), same data order and sampling seeds across losses
    runs = []
    for loss in config.losses:
        overrides = dict(base.loss_overrides)
        overrides["beta"] = config.beta
        for seed in range(config.seeds):
            runs.append(
                base.replace(
                    output_dir=str(run_dir(out, loss, seed)),
                    model=init,
                    loss=loss,
                    loss_overrides=tuple(overrides.items()),
                    seed=seed,
                )
            )
    for run in runs:
        run.loss_config()  # fail before any work on a bad preset/override
    jobs = config.jobs or min(os.cpu_count() or 1, 4)
    print(f"compare: {len(runs)} runs ({', '.join(config.losses)} x {config.seeds} seeds), {jobs} at a time")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for run, seconds in zip(runs, pool.map(_train_one, runs)):
            print(f"  {run.loss} seed {run.seed}: {seconds:.0f} s -> {run.output_dir}")

    # ---- report
    curves = {loss: [load_metrics(run_dir(out, loss, s)) for s in range(config.seeds)] for loss in config.losses}
    plot_paths = plot_comparison(curves, out, config.window)
    report = out / "report.md"
    report.write_text(render_report(config, base, curves, plot_paths, time.time() - started))
    print(f"compare: wrote {report}")
    return report


def _train_one(run: Any) -> float:
    from drgrpo.train.trainer import train

    started = time.time()
    train(run)
    return time.time() - started


# --------------------------------------------------------------------------- metrics


@dataclass
class RunCurves:
    """One run's curves: per-step rollout metrics and the held-out evaluations."""

    steps: list[int]
    reward: list[float | None]
    length_correct: list[float | None]
    length_incorrect: list[float | None]
    eval_steps: list[int]
    eval_accuracy: list[float]
    frac_truncated: list[float | None] = field(default_factory=list)  # share cut off at the token budget


def load_metrics(path: Path) -> RunCurves:
    """Parse ``metrics.jsonl``: lines with ``reward`` are rollout steps, lines with ``eval/accuracy`` evaluations."""
    curves = RunCurves([], [], [], [], [], [])
    for row in read_metrics_file(path / METRICS_FILE):  # a cut-off last line is left out, with a warning
        if "eval/accuracy" in row:
            curves.eval_steps.append(int(row["step"]))
            curves.eval_accuracy.append(math.nan if row["eval/accuracy"] is None else float(row["eval/accuracy"]))
        elif "reward" in row:
            curves.steps.append(int(row["step"]))
            curves.reward.append(row["reward"])
            curves.length_correct.append(row.get("length_correct"))
            curves.length_incorrect.append(row.get("length_incorrect"))
            curves.frac_truncated.append(row.get("frac_truncated"))
    return curves


def moving_average(values: list[float | None], window: int) -> list[float]:
    """Trailing mean over the last ``window`` defined values (NaN until one is defined)."""
    out, recent = [], []
    for v in values:
        if v is not None:
            recent.append(v)
            recent = recent[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def tail_mean(values: list[float | None], fraction: float = 0.2) -> float:
    """Mean of the defined values in the last ``fraction`` of the run (the 'final' value of a noisy curve)."""
    tail = values[-max(1, int(len(values) * fraction)) :]
    defined = [v for v in tail if v is not None]
    return sum(defined) / len(defined) if defined else math.nan


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (std 0 for a single seed); NaN entries are left out."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return math.nan, math.nan
    return statistics.fmean(defined), statistics.stdev(defined) if len(defined) > 1 else 0.0


# --------------------------------------------------------------------------- plots and report

PANELS = (
    ("reward", "rollout reward (moving average)"),
    ("eval_accuracy", "held-out accuracy (greedy)"),
    ("length_correct", "length of correct completions"),
    ("length_incorrect", "length of incorrect completions"),
)


def plot_comparison(curves: dict[str, list[RunCurves]], out: Path, window: int) -> dict[str, Path]:
    """One PNG per panel plus ``compare.png`` with all four; mean over seeds, band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths: dict[str, Path] = {}
    grid, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for (key, title), grid_ax in zip(PANELS, axes.flat):
        single, ax = plt.subplots(figsize=(6, 4))
        for target in (ax, grid_ax):
            for loss, runs in curves.items():
                if key == "eval_accuracy":
                    xs = runs[0].eval_steps
                    ys = np.array([r.eval_accuracy[: len(xs)] for r in runs], dtype=float)
                else:
                    xs = runs[0].steps
                    ys = np.array([moving_average(getattr(r, key), window)[: len(xs)] for r in runs], dtype=float)
                mean = np.nanmean(ys, axis=0)
                (line,) = target.plot(xs, mean, label=f"{loss} (mean of {len(runs)} seeds)")
                target.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=line.get_color(), alpha=0.2)
            target.set_title(title)
            target.set_xlabel("RL step")
            target.grid(alpha=0.3)
            target.legend(fontsize=8)
        single.tight_layout()
        paths[key] = out / f"{key}.png"
        single.savefig(paths[key], dpi=110)
        plt.close(single)
    grid.tight_layout()
    paths["all"] = out / "compare.png"
    grid.savefig(paths["all"], dpi=110)
    plt.close(grid)
    return paths


def summary_rows(curves: dict[str, list[RunCurves]]) -> list[dict[str, Any]]:
    """Per loss: first/last held-out accuracy and final lengths, each as (mean, spread) over seeds."""
    rows = []
    for loss, runs in curves.items():
        rows.append(
            {
                "loss": loss,
                "acc_first": mean_spread([r.eval_accuracy[0] if r.eval_accuracy else math.nan for r in runs]),
                "acc_last": mean_spread([r.eval_accuracy[-1] if r.eval_accuracy else math.nan for r in runs]),
                "len_correct_first": mean_spread([tail_mean(r.length_correct[:10], 1.0) for r in runs]),
                "len_correct": mean_spread([tail_mean(r.length_correct) for r in runs]),
                "len_incorrect_first": mean_spread([tail_mean(r.length_incorrect[:10], 1.0) for r in runs]),
                "len_incorrect": mean_spread([tail_mean(r.length_incorrect) for r in runs]),
                "truncated": mean_spread([tail_mean(r.frac_truncated) for r in runs]),
            }
        )
    return rows


def _fmt(pair: tuple[float, float], digits: int = 2) -> str:
    mean, spread = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def render_report(
    config: CompareConfig, base: Any, curves: dict[str, list[RunCurves]], plots: dict[str, Path], seconds: float
) -> str:
    run = base.replace(loss=config.losses[0])
    lines = [
        "# GRPO vs Dr. GRPO: lengths of correct and incorrect completions",
        "",
        f"{len(config.losses)} losses x {config.seeds} seeds from one initial policy, {seconds / 60:.1f} min in all.",
        f"Settings: steps={run.steps}, prompts_per_step={run.prompts_per_step}, group_size={run.group_size}, "
        f"max_new_tokens={run.max_new_tokens} (Dr. GRPO's L), temperature={run.temperature}, lr={run.lr}, "
        f"beta={config.beta}, "
        + (
            f"initial policy {run.model}, data {run.dataset or 'the built-in task'}."
            if getattr(run, "model", None)
            else f"warm-start working tokens 0..{run.task.max_work} {run.task.work_position} the answer"
            + (
                f", a wrong last digit ({run.task.noise_kind}) in {run.task.answer_noise:g} of the warm-start answers."
                if getattr(run.task, "answer_noise", 0.0)
                else "."
            )
        ),
    ]
    if config.extra:
        lines.append("Notes: " + ", ".join(f"{k}={v}" for k, v in config.extra.items()))
    lines += [
        "",
        "Lengths are in tokens (the end-of-sequence token included) of the rollout completions; 'first' is the",
        "mean over the first 10 RL steps, 'final' over the last 20% of steps; each cell is mean ± std over seeds.",
        "'truncated final' is the share of rollout completions cut off at max_new_tokens, over the same steps.",
        "",
        "| loss | held-out acc. first | held-out acc. last | len. correct first | len. correct final "
        "| len. incorrect first | len. incorrect final | truncated final |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary_rows(curves):
        lines.append(
            f"| `{row['loss']}` | {_fmt(row['acc_first'], 3)} | {_fmt(row['acc_last'], 3)} | "
            f"{_fmt(row['len_correct_first'])} | {_fmt(row['len_correct'])} | "
            f"{_fmt(row['len_incorrect_first'])} | {_fmt(row['len_incorrect'])} | {_fmt(row['truncated'], 3)} |"
        )
    lines += ["", f"![all panels]({plots['all'].name})", ""]
    for key, title in PANELS:
        lines.append(f"- {title}: [{plots[key].name}]({plots[key].name})")
    lines.append("")
    return "\n".join(lines)
