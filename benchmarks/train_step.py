"""One training step of ``drgrpo train``, fused vs not: peak memory and time at a large vocabulary.

The step is the trainer's policy update (:func:`drgrpo.train.loop.update.policy_update`) on a fixed rollout:
old log-probs (two PPO epochs), reference log-probs (a frozen reference model), the Dr. GRPO loss over
K micro-batches with one step normaliser, backward, AdamW. Generation and rewards are left out: they are
the same in both modes. ``--fused`` computes every log-prob from the last hidden states (the loss through
``fused_policy_loss``, old and reference log-probs through ``chunked_logprobs``); without it, each forward
builds the ``(b, P + T, V)`` logits.

The model is the built-in Llama shape with an enlarged vocabulary (V = 151,936 by default, the Qwen
vocabulary), initialised locally. Each (mode, repetition) runs in a fresh subprocess, A B A B, so the
peak of one mode never inflates the other's; memory is the peak resident set size during the step minus
the resident size just before it (see ``fused.PeakRSS``). Ratios come from the same run.

    python benchmarks/train_step.py                          # V = 151936, 3 repetitions
    python benchmarks/train_step.py --vocab 32000 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fused import PeakRSS

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from drgrpo import LossConfig
    from drgrpo.train import TrainConfig
    from drgrpo.train.loop.rollout import Rollout
    from drgrpo.train.loop.update import TrainState, policy_update

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hf = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=args.prompt + args.tokens)  # fmt: skip
    model = LlamaForCausalLM(hf).train()
    ref = LlamaForCausalLM(hf).eval().requires_grad_(False)
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    b, p, t = args.completions, args.prompt, args.tokens
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    batch = Rollout(
        torch.randint(0, args.vocab, (b, p), generator=g),
        torch.ones(b, p, dtype=torch.long),
        torch.randint(0, args.vocab, (b, t), generator=g).masked_fill(mask == 0, 0),
        mask,
        [""] * b,
        torch.zeros(b, dtype=torch.bool),
    )
    advantages = torch.randn(b, generator=g)
    config = TrainConfig(micro_batch_size=args.micro, ppo_epochs=2, fused=args.fused, max_new_tokens=t)
    loss = LossConfig.preset("dr_grpo", max_completion_length=t)
    optimizer = config.optimizer(model.parameters())
    state = TrainState(model=model, policy=model, optimizer=optimizer, tokenizer=None, ref_model=ref, step=0)
    with PeakRSS() as peak:
        started = time.perf_counter()
        policy_update(state, batch, advantages, loss, config, step=1)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mib": (peak.peak - peak.start) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--completions", type=int, default=64, help="B: 8 prompts x G = 8 by default")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens P")
    parser.add_argument("--tokens", type=int, default=64, help="completion budget T (completions are ragged)")
    parser.add_argument("--micro", type=int, default=16, help="completions per micro-batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train-step-cpu.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    base = [sys.executable, __file__, "--worker", *[f"--{k}={getattr(args, k)}" for k in
            ("vocab", "hidden", "completions", "prompt", "tokens", "micro", "threads")]]  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"logits": [], "fused": []}
    for rep in range(args.reps):
        for mode in ("logits", "fused"):  # A B A B
            cmd = base + (["--fused"] if mode == "fused" else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"rep {rep} {mode:6s} {runs[mode][-1]['seconds']:.2f} s  {runs[mode][-1]['peak_mib']:.0f} MiB",
                flush=True,
            )
    summary = {
        mode: {
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "peak_mib_median": statistics.median(r["peak_mib"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    ratios = [f["seconds"] / lg["seconds"] for f, lg in zip(runs["fused"], runs["logits"])]
    mem = [f["peak_mib"] / lg["peak_mib"] for f, lg in zip(runs["fused"], runs["logits"])]
    summary["fused_over_logits"] = {"time_ratios": ratios, "memory_ratios": mem,
                                    "time_ratio_median": statistics.median(ratios),
                                    "memory_ratio_median": statistics.median(mem)}  # fmt: skip
    summary["setting"] = {k: getattr(args, k) for k in ("vocab", "hidden", "completions", "prompt", "tokens", "micro",
                                                         "threads", "reps")}  # fmt: skip
    summary["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, **summary}, indent=2))
    s = summary
    print(
        f"V = {args.vocab}: one step {s['logits']['seconds_median']:.2f} s / {s['logits']['peak_mib_median']:.0f} MiB "
        f"with logits, {s['fused']['seconds_median']:.2f} s / {s['fused']['peak_mib_median']:.0f} MiB fused: "
        f"time x{s['fused_over_logits']['time_ratio_median']:.2f}, "
        f"peak memory x{s['fused_over_logits']['memory_ratio_median']:.2f} (medians of per-pair ratios)"
    )


if __name__ == "__main__":
    main()
