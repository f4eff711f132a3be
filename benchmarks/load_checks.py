"""What the load-time weight checks cost: a NaN or an infinity in a model's weights is refused at load.

``check_finite_files`` is what ``drgrpo train`` runs on its ``--model`` or resumed checkpoint before it writes
anything (the safetensors file, one tensor at a time, on the CPU); ``check_finite_weights`` is what every
``load_model`` runs once the weights are loaded (on their device). Each is timed against ``load_model`` itself (its
check included) on a random float32 Llama written once into ``--dir``; median of ``--reps``, one thread.

    python benchmarks/load_checks.py --dir /tmp/load_checks_model
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drgrpo.train.loop.model import check_finite_files, check_finite_weights, load_model


def median_seconds(f: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the model is written (once)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not (args.dir / "model.safetensors").exists():
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, vocab_size=32000,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                             tie_word_embeddings=False)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(args.dir, safe_serialization=True)
    cpu = torch.device("cpu")
    model = load_model(args.dir, "float32", cpu)
    params = sum(p.numel() for p in model.parameters())
    load = median_seconds(lambda: load_model(args.dir, "float32", cpu), args.reps)
    files = median_seconds(lambda: check_finite_files(args.dir), args.reps)
    weights = median_seconds(lambda: check_finite_weights(model, args.dir), args.reps)
    print(f"{params / 1e6:.1f}M float32 parameters, CPU, 1 thread, median of {args.reps}:")
    print(f"  load_model (its check included) {load:.3f} s")
    print(f"  check_finite_files              {files:.3f} s  (drgrpo train, before writing anything)")
    print(f"  check_finite_weights            {weights:.3f} s  (every load_model)")


if __name__ == "__main__":
    main()
