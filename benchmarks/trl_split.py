"""Stock TRL vs DrGRPOTrainer: how far the first optimizer step's gradient is from the whole step's gradient.

For the token-mean losses (TRL ``loss_type="bnpo"`` and ``"dapo"``; drgrpo's ``bnpo`` and ``dapo`` presets) with
gradient accumulation K = 4 and ``steps_per_generation`` 2 and 4, on one process and on two gloo processes (16
completions per optimizer step in both cases), it runs ``trainer.train()`` for one step, reads the gradient just
before the optimizer step, and compares it with the gradient of the token mean over all the step's rows in one
batch (``benchmarks/trl_harness.py``, shared with the tests: no TRL code, advantages from the run's own rewards).
The oracle is the split-invariant objective each run claims: for stock TRL, the token mean over the step with TRL's
advantages (``trl.dapo``: what ``bnpo``/``dapo`` are meant to be when the batch is not split); for drgrpo, its
own preset. Figures: ``max |g - g_whole| / max |g_whole|`` over all parameters, max over ``--seeds`` seeds.

Stock TRL and DrGRPOTrainer see the same rollout for the same seed (checked, last column): with spg = 2 < K
DrGRPOTrainer generates the window's second generation batch before the first micro-batches' backward passes
instead of after them, but with the same weights and the same sequence of random draws.

    python benchmarks/trl_split.py                 # writes benchmarks/results/trl-split.md and .json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from trl import GRPOTrainer

import trl_harness as h  # beside this file: the TRL runs and the oracle, shared with the tests
from drgrpo import LossConfig
from drgrpo.integrations.trl import DrGRPOTrainer
from drgrpo.train.loop.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]

K = 4
ROWS_PER_STEP = 16


def jobs_for(seeds: list[int], processes: int, spgs: list[int], losses: list[str]) -> list[dict]:
    per_device = ROWS_PER_STEP // K // processes
    jobs = []
    for seed in seeds:
        for spg in spgs:
            for loss in losses:
                common = {"k": K, "spg": spg, "per_device": per_device, "seed": seed}
                jobs.append({"trainer": "stock", "loss_type": loss, **common})
                jobs.append({"trainer": "drgrpo", "loss_config": loss, **common})
    return jobs


def oracle_config(job: dict) -> LossConfig:
    return LossConfig.preset("trl.dapo") if job["trainer"] == "stock" else LossConfig.preset(job["loss_config"])


def measure(job: dict, generations: list, micro: list, grads: dict, model_dir: Path) -> float:
    config = oracle_config(job)
    rollout = h.step_rollout(generations, micro, config, build_tokenizer())
    assert rollout.mask.shape[0] == ROWS_PER_STEP
    _, whole, _ = h.whole_batch_gradient(model_dir, rollout, config)
    return h.relative_difference(grads, whole)


def one_process(jobs: list[dict], model_dir: Path, out: Path) -> list[dict]:
    rows = []
    for j, job in enumerate(jobs):
        job = dict(job)
        cls = DrGRPOTrainer if job["trainer"] == "drgrpo" else GRPOTrainer
        overrides = {"seed": job["seed"]} | ({"loss_type": job["loss_type"]} if cls is GRPOTrainer else {})
        args = h.grpo_args(out / f"p1-{j}", job["k"], job["spg"], per_device=job["per_device"], **overrides)
        kwargs = {"loss_config": job["loss_config"]} if cls is DrGRPOTrainer else {}
        trainer = h.run(cls, model_dir, args, **kwargs)
        diff = measure(job, trainer.generations, trainer.micro[:K], trainer.first_step_grads, model_dir)
        rows.append({**job, "processes": 1, "rel_diff": diff, "rollout": _fingerprint(trainer.generations)})
        print(f"P=1 {job}: {diff:.3g}", flush=True)
    return rows


def two_processes(jobs: list[dict], model_dir: Path, out: Path) -> list[dict]:
    ranks = h.run_ranks(jobs, model_dir, 2, out / "ranks")
    rows = []
    pad = build_tokenizer().pad_token_id
    for j, job in enumerate(jobs):
        records = [r[j] for r in ranks]
        _, whole, rollout = h.whole_batch_of_ranks(records, oracle_config(job), model_dir, K)  # once for both ranks
        assert rollout.mask.shape[0] == ROWS_PER_STEP
        diffs = [h.relative_difference(r["grads"][0], whole) for r in records]
        generations = h.merge_ranks([r["generations"] for r in records], pad)
        rows.append({**job, "processes": 2, "rel_diff": max(diffs), "rollout": _fingerprint(generations)})
        print(f"P=2 {job}: {max(diffs):.3g}", flush=True)
    return rows


def _fingerprint(generations: list) -> int:
    return hash(tuple(tuple(out["completion_ids"].flatten().tolist()) for _, out in generations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--losses", default="bnpo,dapo", help="token-mean losses to run (default: bnpo,dapo)")
    parser.add_argument("--spg", default="2,4", help="steps_per_generation values (default: 2,4)")
    parser.add_argument("--processes", default="1,2", help="process counts (default: 1,2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trl-split.md"))
    a = parser.parse_args()
    losses, spgs, counts = (
        a.losses.split(","),
        [int(v) for v in a.spg.split(",")],
        [int(v) for v in a.processes.split(",")],
    )
    torch.set_num_threads(1)
    load_before, started = os.getloadavg(), time.time()
    seeds = list(range(a.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = h.save_tiny_model(Path(tmp) / "tiny")
        rows = one_process(jobs_for(seeds, 1, spgs, losses), model_dir, Path(tmp)) if 1 in counts else []
        if 2 in counts:
            rows += two_processes(jobs_for(seeds, 2, spgs, losses), model_dir, Path(tmp))
    load_after = os.getloadavg()

    lines = [
        "# Gradient accumulation inside TRL: first-step gradient vs the whole step's gradient",
        "",
        f"TRL {_v('trl')}, transformers {_v('transformers')}, accelerate {_v('accelerate')}, torch {_v('torch')}; "
        f"the tiny Llama (float32, CPU, gloo for P = 2), {ROWS_PER_STEP} completions of up to {h.MAX_NEW} tokens "
        f"per optimizer step, K = {K}, seeds {seeds}. Load average before {load_before[0]:.1f}, after "
        f"{load_after[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"{time.time() - started:.0f} s. Command: `python benchmarks/trl_split.py --seeds {a.seeds}"
        + (
            ""
            if (a.losses, a.spg, a.processes) == ("bnpo,dapo", "2,4", "1,2")
            else f" --losses {a.losses} --spg {a.spg} --processes {a.processes}"
        )
        + "`.",
        "",
        "`max |g - g_whole| / max |g_whole|`, largest over the seeds (median in parentheses). Oracle: the token mean "
        "over the whole step (stock TRL: with TRL's advantages, `trl.dapo`; drgrpo: its own preset).",
        "",
        "| loss | spg | P | stock TRL | DrGRPOTrainer | same rollout |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for loss in losses:
        for spg in spgs:
            for processes in counts:
                sel = [r for r in rows if r["spg"] == spg and r["processes"] == processes]
                stock = [r for r in sel if r["trainer"] == "stock" and r["loss_type"] == loss]
                ours = [r for r in sel if r["trainer"] == "drgrpo" and r["loss_config"] == loss]
                same = sum(s["rollout"] == o["rollout"] for s, o in zip(stock, ours))
                lines.append(
                    f"| {loss} | {spg} | {processes} | {_cell(stock)} | {_cell(ours)} | {same}/{len(stock)} seeds |"
                )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def _cell(rows: list[dict]) -> str:
    values = [r["rel_diff"] for r in rows]
    return f"{max(values):.2g} ({statistics.median(values):.2g})"


def _v(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
