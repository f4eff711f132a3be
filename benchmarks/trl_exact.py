"""DrGRPOTrainer on one device (CUDA by default) against the whole-batch gradient computed on the CPU.

For each case (preset, gradient accumulation K, ``steps_per_generation`` spg, fused or TRL's head, dtype) it
trains one optimizer step of the project's tiny Llama with ``DrGRPOTrainer.train()`` on the device, reads the
gradient just before the optimizer step, and compares it with the gradient of drgrpo's loss over all the step's
rows in one batch, computed in float32 on the CPU with no TRL code (``benchmarks/trl_harness.py``, the
oracle of the test suite), and the sum of the micro-batches' losses with the whole batch's loss. Figures:
``max |g - g_whole| / max |g_whole|`` over all parameters, and the loss's relative difference. float32 cases must
agree to 1e-4 (device kernels against CPU ones; on a CPU they agree to about 3e-7); the bf16 case (autocast,
float32 weights) is reported, not checked. Every case runs even if an earlier one fails; the exit status is 1
if any float32 case failed or was off.

    python benchmarks/trl_exact.py --device cuda --out benchmarks/results/gpu-exact.md
    python benchmarks/trl_exact.py --device cpu --out /tmp/exact.md     # the same on a CPU (fewer cases)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # trl_harness, the runs and the oracle shared with the tests, is beside this file

TOL = 1e-4
# (preset, K, spg, fused, dtype); spg < K: one window spans two generation batches; grpo: KL to a reference model
CASES = {
    "cuda": [
        ("dr_grpo", 2, 2, True, "float32"),
        ("dr_grpo", 2, 2, False, "float32"),
        ("grpo", 4, 2, True, "float32"),
        ("grpo", 2, 4, False, "float32"),
        ("dr_grpo", 2, 2, True, "bfloat16"),
    ],
    "cpu": [
        ("dr_grpo", 2, 1, True, "float32"),
        ("grpo", 2, 2, False, "float32"),
    ],
}


def check_case(case: tuple, device: str, model_dir: Path, out_dir: Path) -> dict:
    """Train one step of ``case`` on ``device``; its gradient and loss against the CPU whole-batch oracle."""
    import torch

    import trl_harness as h
    from drgrpo.integrations.trl import DrGRPOTrainer

    preset, k, spg, fused, dtype = case
    args = h.grpo_args(out_dir, k, spg, use_cpu=device == "cpu", bf16=dtype == "bfloat16")
    trainer = h.run(DrGRPOTrainer, model_dir, args, loss_config=preset, fused=fused)
    ran_on = next(trainer.model.parameters()).device.type
    if ran_on != device:
        raise RuntimeError(f"the trainer ran on {ran_on}, not {device}")
    record = {"generations": trainer.generations, "micro": trainer.micro}
    loss, grads, rollout = h.whole_batch_of_ranks([record], h.preset_config(preset), model_dir, k)
    got = {n: g.float().cpu() for n, g in trainer.step_grads[0].items()}
    total = sum(float(x) for x in trainer.losses[:k])
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "grad": h.relative_difference(got, grads),
        "loss": abs(total - float(loss)) / max(1.0, abs(float(loss))),
        "rows": int(rollout.mask.shape[0]),
        "tokens": int(rollout.mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-exact.md"))
    a = parser.parse_args()

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the default; said here)
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(1 if a.device == "cuda" else min(2, torch.get_num_threads()))
    import trl_harness as h

    started = time.time()
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = h.save_tiny_model(Path(tmp) / "tiny")
        for i, case in enumerate(CASES[a.device]):
            preset, k, spg, fused, dtype = case
            label = f"| {preset} | {k} | {spg} | {'fused' if fused else 'TRL head'} | {dtype} |"
            t0 = time.time()
            try:
                r = check_case(case, a.device, model_dir, Path(tmp) / f"run{i}")
            except Exception as error:  # one case failing must not hide the others
                failed = True
                traceback.print_exc()
                rows.append(f"{label} failed: `{type(error).__name__}: {str(error).splitlines()[0][:200]}` | - | - |")
                print(f"FAILED {case}: {error}", flush=True)
                continue
            checked = dtype == "float32"
            ok = r["grad"] <= TOL and r["loss"] <= TOL
            failed |= checked and not ok
            verdict = ("ok" if ok else f"OFF (> {TOL:g})") if checked else "reported"
            rows.append(f"{label} {r['grad']:.2g} | {r['loss']:.2g} | {verdict} ({time.time() - t0:.0f} s) |")
            print(f"{case}: gradient {r['grad']:.3g}, loss {r['loss']:.3g}: {verdict}", flush=True)

    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU"
    text = "\n".join(
        [
            f"## DrGRPOTrainer against the whole-batch gradient ({a.device}: {name})",
            "",
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
            f"{time.time() - started:.0f} s. Command: `python benchmarks/trl_exact.py --device {a.device}`. One "
            "optimizer step of the tiny Llama (V = 18, H = 64, G = 4, 8 new tokens) trained on the device; the oracle "
            "is the float32 gradient of the whole step's rows in one batch on the CPU, no TRL code. Relative "
            f"differences; float32 must be within {TOL:g}, bf16 (autocast) is reported.",
            "",
            "| preset | K | spg | loss path | dtype | gradient vs whole batch | loss vs whole batch | check |",
            "|---|---:|---:|---|---|---:|---:|---|",
            *rows,
            "",
        ]
    )
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
