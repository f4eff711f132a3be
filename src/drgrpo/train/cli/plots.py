"""``drgrpo plot DIR``: PNG plots of a run's ``metrics.jsonl`` into ``DIR/plots/``.

One figure per quantity (reward, accuracy, lengths of correct and incorrect completions,
loss, KL) plus ``summary.png`` with all of them, for a README or a quick look.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from drgrpo.train.run.metrics_log import METRICS_FILE, read_metrics_file

PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("reward", "reward (train batch)", (("reward", "mean reward"),)),
    (
        "accuracy",
        "accuracy",
        (
            ("eval/accuracy", "held-out, greedy"),
            ("eval_sampled/accuracy", "held-out, sampled"),
            ("accuracy", "train batch, sampled"),
        ),
    ),
    ("lengths", "completion length (tokens)", (("length_correct", "correct"), ("length_incorrect", "incorrect"))),
    ("loss", "loss", (("loss", "policy loss"),)),
    ("kl", "KL(policy || reference)", (("kl", "k3 estimate per token"),)),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file (a run directory or the file itself). A last line cut off (a run writing
    it now, or a full disk) is left out with a warning; a bad line elsewhere is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {str(path)!r} (expected DIR/metrics.jsonl from drgrpo train)")
    return read_metrics_file(path)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(row["step"])
            ys.append(float(v))
    return xs, ys


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, smooth: int = 5) -> list[Path]:
    """Write ``run_dir/plots/{reward,accuracy,lengths,loss,kl,summary}.png``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def draw(ax: Any, title: str, series: tuple[tuple[str, str], ...]) -> None:
        for key, label in series:
            xs, ys = _series(rows, key)
            if not xs:
                continue
            if key.startswith("eval"):  # eval/ and eval_sampled/: points, not smoothed
                ax.plot(xs, ys, marker="o", label=label)
            else:
                ax.plot(xs, _smooth(ys, smooth), label=label)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()

    for name, title, series in PANELS:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        draw(ax, title, series)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.3))
    for ax, (_name, title, series) in zip(axes, PANELS, strict=True):
        draw(ax, title, series)
    fig.suptitle(f"drgrpo train: {run_dir.name}")
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
