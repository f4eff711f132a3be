"""The tokens behind a step's logged KL: rerun steps of a ``drgrpo train`` run and show the largest token's share.

    python docs/training/kl_tokens.py runs/default --from-step 200 --to-step 224

The run directory is copied to a temporary directory (the original is left alone) and resumed there from its
checkpoint of ``--from-step`` up to ``--to-step``, which redoes those steps bit for bit (docs/training.md). The
logged ``kl`` is the mean over the step's completion tokens of k3 = pi_ref/pi - log(pi_ref/pi) - 1
(:func:`drgrpo.kl.kl_penalty`), read here where the loss computes it (:func:`drgrpo.loss.loss_metrics`). For each
step: the logged kl, the number of tokens, the largest single token's k3 and the mean without that token.
One process, the unfused loss (the default run's).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

import drgrpo.loss
from drgrpo.train.cli.main import main as drgrpo_main


def tokens_k3(run: Path, first: int, last: int) -> list[dict[str, Any]]:
    """Per step ``first + 1 .. last``: the logged kl, the tokens, the largest token's k3, the mean without it."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    if config.get("fused"):
        raise SystemExit("this script reads the unfused loss; the run used --fused")
    rows = config["prompts-per-step"] * config["group-size"]
    calls_per_step = config["ppo-epochs"] * math.ceil(rows / config["micro-batch-size"])
    calls: list[tuple[float, float, float]] = []  # (tokens, sum of k3, largest k3) per loss call
    original = drgrpo.loss.loss_metrics

    def recording(terms: Any, mask: Any) -> Any:
        if terms.kl is not None:
            k3 = terms.kl.detach() * mask.to(terms.kl.dtype)
            calls.append((float(mask.sum()), float(k3.sum()), float(k3.max())))
        return original(terms, mask)

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        shutil.copytree(run, copy)
        checkpoints = copy / "checkpoints"
        start = f"step_{first:06d}"
        if not (checkpoints / start).is_dir():
            raise SystemExit(
                f"{run} has no checkpoint of step {first}: {sorted(p.name for p in checkpoints.iterdir())}"
            )
        for later in checkpoints.glob("step_*"):
            if later.name > start:
                shutil.rmtree(later)
        (checkpoints / "latest").write_text(start)
        drgrpo.loss.loss_metrics = recording  # type: ignore[assignment]
        try:
            code = drgrpo_main(["train", "--resume", str(copy), "--steps", str(last), "--no-progress"])
        finally:
            drgrpo.loss.loss_metrics = original  # type: ignore[assignment]
        if code != 0:
            raise SystemExit(f"the rerun failed with exit code {code}")
        logged = {r["step"]: r["kl"] for r in map(json.loads, (copy / "metrics.jsonl").read_text().splitlines())
                  if "kl" in r}  # fmt: skip
    out = []
    for k, step in enumerate(range(first + 1, last + 1)):
        mine = calls[k * calls_per_step : (k + 1) * calls_per_step]
        tokens, total, top = sum(c[0] for c in mine), sum(c[1] for c in mine), max(c[2] for c in mine)
        out.append({"step": step, "kl": logged[step], "tokens": int(tokens), "largest_k3": top,
                    "kl_without_it": (total - top) / (tokens - 1)})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="A drgrpo train output directory.")
    parser.add_argument("--from-step", type=int, required=True, help="The checkpoint to resume from.")
    parser.add_argument("--to-step", type=int, required=True, help="The last step to redo.")
    args = parser.parse_args()
    print(f"{'step':>5} {'kl':>7} {'tokens':>6} {'largest k3':>10} {'kl without it':>13}")
    for r in tokens_k3(args.run, args.from_step, args.to_step):
        print(f"{r['step']:5d} {r['kl']:7.3f} {r['tokens']:6d} {r['largest_k3']:10.1f} {r['kl_without_it']:13.3f}")


if __name__ == "__main__":
    main()
