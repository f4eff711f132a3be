"""One GRPO training step inside TRL: time and peak memory of the loss step, by how the loss is computed.

Variants (each in a fresh subprocess, run side by side A B C D A B C D ...):

- ``drgrpo-fused``: ``DrGRPOTrainer(fused=True)``: ``drgrpo.fused_policy_loss`` from the last hidden states
  and ``lm_head`` (no TRL log-prob head, no ``(N, V)`` logits);
- ``drgrpo``: ``DrGRPOTrainer(fused=False)``: TRL's own chunked log-prob head (``add_fused_lm_head``, torch
  ops on CPU) then ``drgrpo.policy_loss``;
- ``trl``: stock ``GRPOTrainer``, its default path since 1.16 (the same chunked head, TRL's loss);
- ``trl-liger``: stock ``GRPOTrainer(use_liger_kernel=True)``. In TRL 1.16 this applies Liger's layer kernels
  only (RMSNorm, SwiGLU, RoPE): TRL turns Liger's fused linear cross-entropy off and keeps its own chunked head,
  and 1.16 has no ``compute_liger_loss`` any more.

The model is the project's tiny Llama with the vocabulary enlarged to V (default 151,936, Qwen's) and hidden
size H; every completion is exactly ``--length`` tokens (``min_new_tokens``), so each step scores
N = completions x length tokens. The loss is the token mean with TRL's advantages (``trl.dapo`` /
``loss_type="dapo"``), float32 (``--dtype bfloat16``: a bf16 model, ``bf16=True``), ``steps_per_generation = K = 1``.

Measured around each micro-step's ``compute_loss`` call and its backward (generation excluded): wall time, and
the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the forward) minus
the resident size then. glibc returns blocks over 64 KiB to the OS on free (``MALLOC_MMAP_THRESHOLD_``), so
resident size follows live tensors. The first step of each process is a warm-up; the figure of a process is the
median of the other steps; the table gives the median over processes and the ratio to stock TRL. With
``--device cuda`` (TRL's head is then its Triton kernel) the memory is ``torch.cuda.max_memory_allocated()``
(its counter reset just before the forward) minus the memory allocated then.

    python benchmarks/trl_step.py                                   # V = 151936, H = 128, 32 x 64 tokens
    python benchmarks/trl_step.py --vocab 32000 --repeats 3 --out benchmarks/results/trl-step-32k.md
    python benchmarks/trl_step.py --device cuda --dtype bfloat16 --out benchmarks/results/trl-step-cuda.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("drgrpo-fused", "drgrpo", "trl", "trl-liger")


# --------------------------------------------------------------------------- one process


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def build_model(path: Path, vocab: int, hidden: int, length: int) -> None:
    """The tiny Llama with a word-level vocabulary of ``vocab`` entries, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from drgrpo.train.loop.tiny import BOS, EOS, PAD, UNK, VOCAB, TinyModelConfig, build_model

    words = list(VOCAB) + [f"w{i}" for i in range(vocab - len(VOCAB))]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.padding_side = "left"
    config = TinyModelConfig(hidden_size=hidden, intermediate_size=4 * hidden, max_positions=length + 16)
    model = build_model(config, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def reward(completions: list[str], **kwargs: object) -> list[float]:
    """Any reward with some spread: the number of distinct words."""
    return [float(len(set(c.split()))) for c in completions]


def _start_peak(device: str) -> int:
    """Reset the peak-memory counter; returns the bytes in use now (resident on CPU, allocated on CUDA)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _reset_peak()
    return _status_kib("VmRSS") * 1024


def _peak(device: str) -> int:
    """The peak bytes in use since :func:`_start_peak` (the step's kernels finished)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def child(
    variant: str,
    model_dir: str,
    completions: int,
    length: int,
    steps: int,
    threads: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from drgrpo.integrations.trl import DrGRPOTrainer
    from drgrpo.train.loop.task import TaskConfig, make_splits

    torch.set_num_threads(threads)
    train, _ = make_splits(TaskConfig())
    dataset = Dataset.from_list([{"prompt": e["prompt"]} for e in train[:256]])
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        num_generations=4,
        max_completion_length=length,
        generation_kwargs={"min_new_tokens": length},
        max_steps=steps,
        learning_rate=1e-5,
        bf16=dtype == "bfloat16",
        use_cpu=device == "cpu",
        model_init_kwargs={"dtype": dtype},
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        loss_type="dapo",
        use_liger_kernel=variant == "trl-liger",
    )
    base = DrGRPOTrainer if variant.startswith("drgrpo") else GRPOTrainer
    records: list[dict] = []

    class Timed(base):  # type: ignore[misc,valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._tokens = int(inputs["completion_mask"].sum())
            self._rss0 = _start_peak(device)
            self._t0 = time.perf_counter()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    kwargs = {"loss_config": "trl.dapo", "fused": variant == "drgrpo-fused"} if base is DrGRPOTrainer else {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = Timed(model_dir, reward, args, dataset, processing_class=tokenizer, **kwargs)
    backward = trainer.accelerator.backward

    def timed_backward(loss, **kw):
        backward(loss, **kw)
        peak = _peak(device) - trainer._rss0  # (synchronises on CUDA)
        seconds = time.perf_counter() - trainer._t0
        records.append({"seconds": seconds, "peak_mib": peak / 2**20, "tokens": trainer._tokens})

    trainer.accelerator.backward = timed_backward
    trainer.train()
    timed = records[1:] or records
    return {
        "variant": variant,
        "seconds": statistics.median(r["seconds"] for r in timed),
        "peak_mib": statistics.median(r["peak_mib"] for r in timed),
        "tokens": timed[0]["tokens"],
        "steps": records,
    }


# --------------------------------------------------------------------------- the parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument(
        "--completions", type=int, default=32, help="completions per step (per_device_train_batch_size)"
    )
    parser.add_argument("--length", type=int, default=64, help="tokens per completion (all completions are full)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per process (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per variant, interleaved A B C D A B C D")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trl-step-cpu.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        result = child(a.child, a.model_dir, a.completions, a.length, a.steps, a.threads, a.device, a.dtype)
        print("RESULT " + json.dumps(result))
        return

    load_before = os.getloadavg()
    started = time.time()
    variants = a.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    failures: dict[str, str] = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(a.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, a.vocab, a.hidden, a.length)
        for repeat in range(a.repeats):
            for variant in variants:
                command = [sys.executable, __file__, "--child", variant, "--model-dir", str(model_dir)]
                command += ["--completions", str(a.completions), "--length", str(a.length)]
                command += ["--steps", str(a.steps), "--threads", str(a.threads)]
                command += ["--device", a.device, "--dtype", a.dtype]
                out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode != 0 or not line:
                    errors = [x for x in out.stderr.splitlines() if "Error" in x]
                    failures[variant] = errors[-1].strip() if errors else f"exit {out.returncode}"
                    print(f"[{repeat}] {variant} failed: {failures[variant]}", flush=True)
                    continue
                result = json.loads(line[-1][len("RESULT ") :])
                results[variant].append(result)
                print(f"[{repeat}] {variant}: {result['seconds']:.3f} s, {result['peak_mib']:.0f} MiB", flush=True)
    load_after = os.getloadavg()

    summary = {
        v: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
            "tokens": rs[0]["tokens"],
        }
        for v, rs in results.items()
        if rs
    }
    base = summary.get("trl")
    n_tokens = next(iter(summary.values()))["tokens"]
    logits_mib = n_tokens * a.vocab * 4 / 2**20
    lines = [
        f"# One GRPO step inside TRL, {a.device.replace('cpu', 'CPU')}, {a.dtype}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs{_gpu(a.device)}; torch "
        f"{_version('torch')} ({a.threads} threads), TRL {_version('trl')}, transformers {_version('transformers')}, "
        f"liger-kernel {_version('liger_kernel')}; Python {platform.python_version()}. Load average before "
        f"{load_before[0]:.1f}, after {load_after[0]:.1f} (other jobs shared the CPUs). "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, total {time.time() - started:.0f} s.",
        "",
        f"Command: `python benchmarks/trl_step.py --vocab {a.vocab} --hidden {a.hidden} --completions "
        f"{a.completions} --length {a.length} --steps {a.steps} --repeats {a.repeats} --threads {a.threads} "
        f"--device {a.device} --dtype {a.dtype}`",
        "",
        f"Tiny Llama (2 layers, H = {a.hidden}), V = {a.vocab:,}, N = {n_tokens:,} completion tokens per step "
        f"(the (N, V) float32 logits would be {logits_mib:,.0f} MiB). Loss forward + backward of one step "
        "(generation excluded), median over steps 2.. of each process, then over processes; peak memory is the "
        + (
            "resident high-water mark during that forward + backward minus the resident size before it."
            if a.device == "cpu"
            else "CUDA max_memory_allocated during that forward + backward minus the memory allocated before it."
        ),
        "",
        "| variant | loss step (s) | x stock TRL | peak memory increment | x stock TRL |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in variants:
        if v not in summary:
            lines.append(f"| {v} | failed: `{failures.get(v, '?')}` | - | - | - |")
            continue
        s = summary[v]
        t_ratio = f"{s['seconds'] / base['seconds']:.2f}" if base else "-"
        m_ratio = f"{s['peak_mib'] / base['peak_mib']:.2f}" if base else "-"
        lines.append(f"| {v} | {s['seconds']:.3f} | {t_ratio} | {s['peak_mib']:,.0f} MiB | {m_ratio} |")
    per_process = [
        f"{v}: " + ", ".join(f"{r['seconds']:.3f}/{r['peak_mib']:.0f}" for r in rs) for v, rs in results.items() if rs
    ]
    lines += [
        "",
        "Per process (seconds, MiB): " + "; ".join(per_process),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"args": vars(a), "summary": summary, "runs": results, "failures": failures}, indent=1)
    )


def _gpu(device: str) -> str:
    """``", GPU: <name>"`` on CUDA (in a subprocess: this process never initialises CUDA)."""
    if device != "cuda":
        return ""
    code = "import torch; print(torch.cuda.get_device_name(0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return f", GPU: {out.stdout.strip() or 'unknown'}"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:
        return "not installed"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
