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

import contextlib
import math
import os
import signal
import statistics
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from drgrpo.config import preset_names
from drgrpo.field_error import FieldError, check_finite_fields
from drgrpo.train.cli.failures import StepFailed, train_or_fail
from drgrpo.train.loop.rewards import REWARD_TRACEBACK, RewardError, reward_traceback
from drgrpo.train.run.checkpoint import check_checkpoint, checkpoints_of, find_checkpoint, read_state, resolve_model_dir
from drgrpo.train.run.metrics_log import METRICS_FILE, read_metrics_file
from drgrpo.train.run.resume import config_changes, plan_run
from drgrpo.train.train_config import TrainConfig

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
        twice = sorted({name for name in self.losses if self.losses.count(name) > 1})
        if twice:
            raise FieldError(
                CompareConfig,
                "losses",
                f"losses names {', '.join(twice)} more than once: each loss is trained once per seed, into its own "
                "runs/LOSS directory; name each loss once",
            )
        if not self.output_dir.strip():
            raise FieldError(CompareConfig, "output_dir", f"output_dir must name a directory, got {self.output_dir!r}")
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


def compare(config: CompareConfig) -> Path | None:
    """Run every (loss, seed) from one initial policy and write ``report.md`` and plots; returns the report path.

    The initial policy is the built-in warm start, or the local model ``config.train.model`` (a Hugging Face
    model directory, a run or a checkpoint; then with ``config.train``'s ``dataset`` and ``rewards``, if any).

    A rerun with the same settings continues the comparison: the cached warm start and every finished run are
    kept, a run that stopped part-way is resumed (exactly, as ``drgrpo train --resume``), the missing runs are
    trained; settings that would change what a kept run computes are refused before any work. A signal
    (SIGINT, SIGTERM) or a failed run stops every run (each saves its last completed step), the report of the
    runs that finished is written, and the signal (KeyboardInterrupt) or the failure propagates. Returns None
    when no run has finished.
    """
    from drgrpo.train.loop.warmstart import warm_start  # transformers: loaded when a comparison starts

    out = Path(config.output_dir)
    base = config.train.replace(output_dir=str(out))
    base.check_trainable()  # --dtype float16: refused before the warm start
    if base.model is not None:
        base = base.replace(model=str(resolve_model_dir(base.model)))
    init = str(base.model) if base.model is not None else str(out / "warm_start")

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
    todo, finished = plan_runs(out, runs)  # a rerun: kept, resumed or new; other settings refused
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        with _sigterm_as_sigint():
            # ---- one initial policy for every run: a local model, or one warm start (cached: a rerun reuses it)
            # with drgrpo train's torch settings (the tiny model on 1 thread: torch's default of one thread per
            # core made this warm start 10-15 times slower on a busy machine; the weights are the same either way)
            base.apply_torch_settings()
            if base.model is None and todo:
                warm_start(init, base.warm_start, base.task, log=print)
            jobs = config.jobs or min(os.cpu_count() or 1, 4)
            kept = f"; {len(finished)} finished before, kept" if finished else ""
            what = f"{len(runs)} runs ({', '.join(config.losses)} x {config.seeds} seeds)"
            print(f"compare: {what}, {jobs} at a time{kept}")
            train_all(todo, jobs, finished)
    finally:  # done, stopped or failed: the report of the runs that finished
        report = write_report(config, base, runs, finished, time.time() - started)
    return report


def plan_runs(out: Path, runs: list[TrainConfig]) -> tuple[list[TrainConfig], list[TrainConfig]]:
    """(runs to train, runs finished before): a run whose directory holds checkpoints is resumed, or kept when
    its newest checkpoint is its last step. Only reads. Raises ValueError before any work when a kept run was made
    with settings that change what it computes (:data:`~drgrpo.train.train_config.OnResume`), or for a damaged
    checkpoint."""
    todo, finished = [], []
    for run in runs:
        path = Path(run.output_dir)
        if not checkpoints_of(path / "checkpoints"):
            todo.append(run)
            continue
        saved = TrainConfig.from_dict(read_state(check_checkpoint(find_checkpoint(str(path))))["train_config"])
        changed = [change for change in config_changes(saved, run) if change.kind != "free"]
        if changed:
            raise ValueError(
                f"--output-dir {out} holds a comparison made with other settings: {path} has "
                f"{', '.join(map(str, changed))} (its value -> the value given). A rerun continues each run with "
                "the settings that made it: give those, or compare into another --output-dir"
            )
        resumed = run.replace(resume=str(path))
        start = plan_run(resumed)
        if start.step >= run.steps and not start.eval_pending:
            finished.append(run)
        else:
            todo.append(resumed)
    return todo, finished


def train_all(runs: list[TrainConfig], jobs: int, finished: list[TrainConfig]) -> None:
    """Train ``runs``, ``jobs`` at a time, each in a process of its own, appending each that reaches its last step
    to ``finished``. A failed run, a stopped run or KeyboardInterrupt here stops them all: every running one is
    sent SIGTERM (it saves its last completed step), the rest never start, and the error propagates."""
    if not runs:
        return
    spawn = get_context("spawn")
    pids = spawn.SimpleQueue()  # each worker's process id, sent as it starts
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn, initializer=_started, initargs=(pids,)) as pool:
        futures = {pool.submit(_train_one, run): run for run in runs}
        try:
            for future in as_completed(futures):
                run = futures[future]
                seconds, step, interrupted = future.result()  # a failed run raises here
                how = "stopped by a signal at" if interrupted else "done,"
                print(f"  {run.loss} seed {run.seed}: {how} step {step} in {seconds:.0f} s -> {run.output_dir}")
                if interrupted:
                    raise KeyboardInterrupt  # a run stopped by a signal of its own: the comparison stops too
                finished.append(run)
        except BaseException:
            for future in futures:
                future.cancel()
            while not pids.empty():  # SIGTERM to the pool's processes: each run saves its last completed step
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids.get(), signal.SIGTERM)
            raise


def _started(pids: Any) -> None:
    """A worker of :func:`train_all` starts: it tells its process id (a queue of the pool's processes)."""
    pids.put(os.getpid())


def _train_one(run: TrainConfig) -> tuple[float, int, bool]:
    """Train one run (in a process of the pool): (seconds, its last step, whether a signal stopped it)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as drgrpo's own command does: no loading bars from every run
    hf_logging.set_verbosity_error()
    started = time.time()
    try:
        result = train_or_fail(run)  # a failed step: StepFailed, which drgrpo compare exits with code 1 for
    except (RewardError, StepFailed) as exc:
        error = exc.cause if isinstance(exc, StepFailed) else exc
        if isinstance(error, RewardError):  # its traceback stays in this process: the reward's frames go as text
            setattr(error, REWARD_TRACEBACK, reward_traceback(error))
        raise
    return time.time() - started, result.step, result.interrupted


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that either stops the comparison in order (in the main
    thread; elsewhere signals are the caller's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_report(
    config: CompareConfig, base: TrainConfig, runs: list[TrainConfig], finished: list[TrainConfig], seconds: float
) -> Path | None:
    """``report.md`` and the plots of the ``finished`` runs (of ``runs``, in their order); None if none finished."""
    out = Path(config.output_dir)
    names = {run.output_dir for run in finished}
    done = [run for run in runs if run.output_dir in names]
    if not done:
        print("compare: no run has finished yet; no report (a rerun continues the comparison)")
        return None
    curves = {
        loss: [load_metrics(Path(run.output_dir)) for run in done if run.loss == loss]
        for loss in config.losses
        if any(run.loss == loss for run in done)
    }
    missing = [f"{run.loss} seed {run.seed}" for run in runs if run.output_dir not in names]
    plot_paths = plot_comparison(curves, out, config.window)
    report = out / "report.md"
    report.write_text(render_report(config, base, curves, plot_paths, seconds, missing))
    print(f"compare: wrote {report}" + (f" ({len(done)} of {len(runs)} runs)" if missing else ""))
    return report


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

EXPLANATION = (
    "GRPO divides each completion's summed token losses by its own length |o_i|, Dr. GRPO by the constant L (the "
    "generation budget). Under GRPO a long incorrect completion is therefore penalised less per token than a short "
    "one, which can make incorrect completions grow longer during training (Liu et al. 2025, arXiv 2503.20783, Fig. "
    "6); Dr. GRPO removes that pull, it does not lengthen anything. So read the *gap* between the lengths of "
    "incorrect and correct completions, GRPO's against Dr. GRPO's, from the same start ('gap change' below): a "
    "length that moves alike under both losses comes from training itself, not from the loss, and a difference "
    "between the losses within the spread over seeds is noise. The bias needs a model whose decision to stop can "
    "depend on whether its answer is already wrong; on the built-in 2-layer model the effect measured so far is a "
    "few hundredths of a token."
)
"""What a comparison shows, at the top of every report: so that nobody reads 'Dr. GRPO makes outputs longer'."""

PLOT_NOTE = (
    "Read the gap between incorrect and correct lengths, one loss against the other; what both losses share comes "
    "from training. Why: docs/length-bias.md"
)
"""The note under the comparison's plots."""


def length_bias_doc() -> str:
    """Where the explanation is: docs/length-bias.md of this source tree (a path a viewer can open), or its name."""
    path = Path(__file__).resolve().parents[3] / "docs" / "length-bias.md"
    return f"[docs/length-bias.md]({path})" if path.is_file() else "docs/length-bias.md in the drgrpo repository"


def reading(rows: list[dict[str, Any]]) -> str | None:
    """One sentence comparing GRPO's gap change with Dr. GRPO's against their spread over seeds (None without
    both losses)."""
    by_loss = {row["loss"]: row["gap_change"] for row in rows}
    if "grpo" not in by_loss or "dr_grpo" not in by_loss:
        return None
    (g, g_spread), (d, d_spread) = by_loss["grpo"], by_loss["dr_grpo"]
    if math.isnan(g) or math.isnan(d):
        return "Reading: a loss has no run with both correct and incorrect completions, so no gap to compare."
    diff, spread = g - d, g_spread + d_spread
    text = (
        f"Reading: over the run the gap (incorrect minus correct length) changed by {g:+.2f} tokens under GRPO "
        f"and {d:+.2f} under Dr. GRPO; GRPO's length bias predicts a positive difference, here {diff:+.2f}"
    )
    if spread == 0:
        return text + ", with one seed and so no spread to compare it with (use --seeds 3 or more)."
    verdict = "within" if abs(diff) <= spread else "larger than"
    return text + f", {verdict} the two losses' spreads over seeds added ({spread:.2f})."


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
        if key.startswith("length"):
            single.text(0.5, 0.01, textwrap.fill(PLOT_NOTE, 90), ha="center", va="bottom", fontsize=7)
            single.tight_layout(rect=(0, 0.08, 1, 1))
        else:
            single.tight_layout()
        paths[key] = out / f"{key}.png"
        single.savefig(paths[key], dpi=110)
        plt.close(single)
    grid.suptitle(f"{' vs '.join(curves)}: mean and min-max over seeds")
    grid.text(0.5, 0.005, PLOT_NOTE, ha="center", va="bottom", fontsize=8)
    grid.tight_layout(rect=(0, 0.03, 1, 1))
    paths["all"] = out / "compare.png"
    grid.savefig(paths["all"], dpi=110)
    plt.close(grid)
    return paths


def gap_change(run: RunCurves) -> float:
    """How much longer incorrect completions became than correct ones over the run, in tokens: the gap
    ``length_incorrect - length_correct`` at the end (last 20% of steps) minus the gap at the start (first 10
    steps). GRPO's length bias makes it positive; Dr. GRPO's expected change is 0 (docs/length-bias.md)."""
    first = tail_mean(run.length_incorrect[:10], 1.0) - tail_mean(run.length_correct[:10], 1.0)
    return tail_mean(run.length_incorrect) - tail_mean(run.length_correct) - first


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
                "gap_change": mean_spread([gap_change(r) for r in runs]),
            }
        )
    return rows


def _fmt(pair: tuple[float, float], digits: int = 2) -> str:
    mean, spread = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def render_report(
    config: CompareConfig,
    base: TrainConfig,
    curves: dict[str, list[RunCurves]],
    plots: dict[str, Path],
    seconds: float,
    missing: list[str] = [],  # noqa: B006 (never changed)
) -> str:
    """report.md: what the comparison shows, its settings, the table over seeds, the plots. ``missing`` names the
    runs of the comparison that have not finished (a signal or a failed run stopped it); the report is of the rest."""
    run = base.replace(loss=config.losses[0])
    rows = summary_rows(curves)
    lines = [
        "# GRPO vs Dr. GRPO: lengths of correct and incorrect completions",
        "",
        "## What this shows",
        "",
        EXPLANATION,
        f"The mechanism, a policy where it is large, and seven settings of this command: {length_bias_doc()}.",
        "",
    ]
    if missing:
        lines += [
            f"**Partial report**: {len(missing)} of {len(config.losses) * config.seeds} runs did not finish "
            f"({', '.join(missing)}); the same command again continues them.",
            "",
        ]
    lines += [
        "## Results",
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
        "'gap change' is (incorrect - correct length) final minus first, per run: how much longer the incorrect",
        "completions became than the correct ones.",
        "",
        "| loss | held-out acc. first | held-out acc. last | len. correct first | len. correct final "
        "| len. incorrect first | len. incorrect final | gap change | truncated final |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['loss']}` | {_fmt(row['acc_first'], 3)} | {_fmt(row['acc_last'], 3)} | "
            f"{_fmt(row['len_correct_first'])} | {_fmt(row['len_correct'])} | "
            f"{_fmt(row['len_incorrect_first'])} | {_fmt(row['len_incorrect'])} | {_fmt(row['gap_change'])} | "
            f"{_fmt(row['truncated'], 3)} |"
        )
    sentence = reading(rows)
    if sentence:
        lines += ["", sentence]
    lines += ["", f"![all panels]({plots['all'].name})", ""]
    for key, title in PANELS:
        lines.append(f"- {title}: [{plots[key].name}]({plots[key].name})")
    lines.append("")
    return "\n".join(lines)
