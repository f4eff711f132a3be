"""Fused loss benchmark: the logits path, Liger-Kernel and drgrpo.fused_policy_loss on identical inputs.

For each size (N = B*T tokens, H hidden, V vocabulary) it times forward + backward of

- ``floor``:  the three bare products ``h W^T``, ``dlogits W``, ``dlogits^T h`` (preallocated outputs);
- ``logits``: ``policy_loss(log_softmax(h W^T)[y])`` with autograd (holds the (N, V) logits);
- ``liger`` / ``liger-compiled``: ``LigerFusedLinearGRPOLoss(compiled=False / True)`` (when installed);
  the compiled variant's first call minus its median is reported as its compile time;
- ``trl-head``: TRL's default log-prob head, as ``GRPOTrainer`` (TRL 1.16) calls it: ``ChunkedLogProbFunction``
  (a Triton kernel on CUDA, torch ops elsewhere; log-probs and entropies, vocabulary chunks of 32768 columns),
  then ``policy_loss`` (when TRL is installed);
- ``drgrpo``: :func:`drgrpo.fused.fused_policy_loss`.

Every (size, method) runs in its own subprocess, so the peak-memory figure of one method is not
inflated by another. Memory is the peak resident set size (sampled every 0.5 ms by a thread reading
/proc/self/statm during one forward + backward after a warm-up call) minus the resident size just
before that call; it includes the gradients the call creates (``W.grad`` is V x H float32).
glibc is told to return every block over 64 KiB to the OS on free (``MALLOC_MMAP_THRESHOLD_``) so that
resident size follows live tensors. The loss is DAPO's (token-mean, clip 0.2/0.28, no KL) with an
``old_logp``, because it has an exact Liger-Kernel equivalent (``loss_type="dapo"``).

    python benchmarks/fused.py                      # CPU, float32, the default sizes; writes the markdown table
    python benchmarks/fused.py --sizes 2048x512x32000 --reps 5
    python benchmarks/fused.py --device cuda --dtype bfloat16 --sizes 8192x2048x151936 \
        --out benchmarks/results/fused-cuda.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_SIZES = "2048x512x32000,2048x512x151936,4096x256x50257"
METHODS = ("floor", "logits", "liger", "liger-compiled", "trl-head", "drgrpo")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- worker (one subprocess)


class PeakRSS:
    """Peak resident set size of this process, sampled by a background thread (bytes)."""

    def __init__(self, period: float = 0.0005) -> None:
        self.period = period
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, self.rss())
        self._stop.set()
        self._thread.join()


def make_inputs(n: int, h: int, v: int, dtype: str, device: str, seed: int = 0):
    import torch

    b = 8
    t = n // b
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    hidden = torch.randn(b, t, h, generator=g).to(device=device, dtype=dt).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dt).requires_grad_(True)
    target = torch.randint(0, v, (b, t), generator=g).to(device)
    mask = torch.ones(b, t, device=device)
    advantages = torch.randn(b, generator=g).to(device)
    with torch.no_grad():  # old log-probs near the current ones, so some ratios clip
        old = torch.empty(b, t)
        for i in range(b):  # row by row: do not hold (N, V) here
            z = (hidden[i].float() @ weight.float().T).log_softmax(-1)
            old[i] = z.gather(-1, target[i, :, None]).squeeze(-1).cpu()
        old = (old + 0.2 * torch.randn(b, t, generator=g)).to(device)
    return hidden, weight, target, mask, advantages, old


def floor_products(hidden, weight, n: int, h: int, v: int):
    """The three bare products of the logits path with preallocated outputs: the time floor."""
    import torch

    h2 = hidden.detach().reshape(n, h)
    w = weight.detach()
    logits = torch.empty(n, v, dtype=hidden.dtype, device=hidden.device)
    dh = torch.empty(n, h, dtype=hidden.dtype, device=hidden.device)
    dw = torch.empty(v, h, dtype=hidden.dtype, device=hidden.device)
    return {
        "h W^T": lambda: torch.mm(h2, w.t(), out=logits),
        "dlogits W": lambda: torch.mm(logits, w, out=dh),
        "dlogits^T h": lambda: torch.mm(logits.t(), h2, out=dw),
    }


def worker(method: str, n: int, h: int, v: int, dtype: str, device: str, reps: int, liger_chunk: int) -> dict:
    import gc

    import torch

    from drgrpo import LossConfig, policy_loss
    from drgrpo.fused import default_chunk_size, fused_policy_loss

    hidden, weight, target, mask, adv, old = make_inputs(n, h, v, dtype, device)
    config = LossConfig.preset("dapo")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result: dict = {"method": method, "threads": torch.get_num_threads()}

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    if method == "floor":
        products = floor_products(hidden, weight, n, h, v)
        for fn in products.values():
            fn()
        times = {name: statistics.median(timed(fn) for _ in range(reps)) for name, fn in products.items()}
        result.update(products=times, time=sum(times.values()))
        return result

    if method == "logits":

        def step():
            z = hidden.reshape(n, h) @ weight.T  # (N, V)
            logp = torch.log_softmax(z.float(), dim=-1).gather(-1, target.reshape(n, 1)).reshape(target.shape)
            out = policy_loss(logp, old, adv, mask, config, validate=False)
            out.loss.backward()
            return out.loss

    elif method == "drgrpo":
        result["chunk_size"] = default_chunk_size(v)

        def step():
            out = fused_policy_loss(hidden, weight, target, mask, adv, config, old_logp=old)
            out.loss.backward()
            return out.loss

    elif method in ("liger", "liger-compiled"):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as e:
            return {"method": method, "skipped": f"liger-kernel not importable: {e}"}
        liger = LigerFusedLinearGRPOLoss(
            beta=0.0,
            compiled=method == "liger-compiled",
            use_ref_model=False,
            chunk_size=liger_chunk,
            epsilon_low=config.epsilon_low,
            epsilon_high=config.clip_high,
            loss_type="dapo",
        )
        result["chunk_size"] = liger_chunk

        def step():
            loss, _ = liger(hidden, weight, target, mask, adv, old_per_token_logps=old)
            loss.backward()
            return loss

    elif method == "trl-head":
        try:
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as columns
        except ImportError as e:
            return {"method": method, "skipped": f"trl not importable: {e}"}
        result["chunk_size"] = columns

        def step():
            logp, _entropy, *_ = ChunkedLogProbFunction.apply(
                hidden.reshape(n, h), weight, None, target.reshape(n), 1.0, columns, None, 1.0, ("log_probs", "entropy")
            )
            out = policy_loss(logp.reshape(target.shape), old, adv, mask, config, validate=False)
            out.loss.backward()
            return out.loss

    else:
        raise ValueError(f"unknown method {method!r}")

    def clear():
        hidden.grad = None
        weight.grad = None
        gc.collect()

    # warm-up call (the compiled Liger variant compiles here); its result is the correctness check
    clear()
    box = {}
    first = timed(lambda: box.update(loss=step()))
    result.update(first=first, loss=float(box["loss"]), **grad_summary(hidden, weight))
    # timed calls, each with the peak-RSS sampler (or CUDA peak stats), interleaved with the bare products
    products = floor_products(hidden, weight, n, h, v)
    for fn in products.values():
        fn()
    times, peaks, floors = [], [], []
    for _ in range(reps):
        clear()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times.append(timed(step))
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRSS() as rss:
                times.append(timed(step))
            peaks.append(rss.peak - rss.start)
        floors.append(sum(timed(fn) for fn in products.values()))
    result.update(
        time=statistics.median(times),
        times=times,
        peak=max(peaks),
        floor_here=statistics.median(floors),
    )
    return result


def grad_summary(hidden, weight) -> dict:
    return {"dh_norm": float(hidden.grad.float().norm()), "dw_norm": float(weight.grad.float().norm())}


# --------------------------------------------------------------------------- driver


def run_one(method: str, size: tuple[int, int, int], args: argparse.Namespace) -> dict:
    n, h, v = size
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT / "src"))
    if method == "liger-compiled":  # a cold inductor cache, so the compile time is the real one
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    cmd = [sys.executable, __file__, "--worker", method, "--sizes", f"{n}x{h}x{v}"]
    cmd += ["--dtype", args.dtype, "--device", args.device, "--reps", str(args.reps)]
    cmd += ["--liger-chunk", str(args.liger_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    try:
        load = f"load average {os.getloadavg()[0]:.1f} before the run"
    except OSError:
        load = ""
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {mem}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); Python {platform.python_version()}; {load}"
    )


def liger_version() -> str:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return "not installed"


def fmt_bytes(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def table(results: dict, sizes: list[tuple[int, int, int]]) -> str:
    lines = [
        "| N x H x V | method | median fwd+bwd (s) | x matmul floor | x Liger eager | x Liger compiled "
        "| peak mem increment | x logits-path mem | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def vs(r: dict, other: dict | None) -> str:
        """Time ratio to another method, raw and (in parentheses) with each divided by its own process's floor."""
        if not other or "time" not in other:
            return "-"
        raw = r["time"] / other["time"]
        norm = (r["time"] / r["floor_here"]) / (other["time"] / other["floor_here"])
        return f"{raw:.2f} ({norm:.2f})"

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-30)

    for size in sizes:
        res = results[size]
        name = "{} x {} x {}".format(*size)
        lmem = res.get("logits", {}).get("peak")
        ref = res.get("logits", {})
        for m in METHODS:
            if m not in res:
                continue
            r = res[m]
            if "time" not in r:
                why = r.get("skipped") or r.get("error") or "not run"
                lines.append(f"| {name} | {m} | - | - | - | - | - | - | {why} |")
                continue
            t = r["time"]
            notes = []
            if m == "floor":
                notes.append(", ".join(f"{k} {x:.3f} s" for k, x in r["products"].items()))
                ratio = 1.0
            else:
                ratio = t / r["floor_here"]
                notes.append(f"floor in this process {r['floor_here']:.3f} s")
            if m == "liger-compiled":
                notes.append(f"compile ~{r['first'] - t:.1f} s (first call {r['first']:.1f} s)")
            if m in ("drgrpo", "liger", "liger-compiled", "trl-head"):
                notes.append(f"chunk_size {r['chunk_size']}" + (" columns" if m == "trl-head" else ""))
            if m not in ("floor", "logits") and "loss" in ref and "loss" in r:
                notes.append(
                    "vs logits path: loss {:.0e}, norm(dh) {:.0e}, norm(dW) {:.0e}".format(
                        rel(r["loss"], ref["loss"]),
                        rel(r["dh_norm"], ref["dh_norm"]),
                        rel(r["dw_norm"], ref["dw_norm"]),
                    )
                )
            peak = r.get("peak")
            lines.append(
                "| {} | {} | {:.3f} | {:.2f} | {} | {} | {} | {} | {} |".format(
                    name,
                    m,
                    t,
                    ratio,
                    vs(r, res.get("liger")) if m != "floor" else "-",
                    vs(r, res.get("liger-compiled")) if m != "floor" else "-",
                    fmt_bytes(peak) if peak is not None else "-",
                    f"{peak / lmem:.2f}" if peak is not None and lmem else "-",
                    "; ".join(notes),
                )
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxHxV (N = 8 rows x N/8 tokens)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--reps", type=int, default=3, help="timed calls per method (median reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--liger-chunk",
        type=int,
        default=8,
        help="LigerFusedLinearGRPOLoss chunk_size (completions per chunk); 8 = the whole batch, its fastest here "
        "(its default 1 measured ~6x slower at 1024x256x32000)",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/fused-<device>.md)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]

    if args.worker:
        ((n, h, v),) = sizes
        print(json.dumps(worker(args.worker, n, h, v, args.dtype, args.device, args.reps, args.liger_chunk)))
        return

    header = machine()
    print(header, flush=True)
    methods = args.methods.split(",")
    results: dict = {}
    t_start = time.time()
    for size in sizes:
        results[size] = {}
        for m in methods:
            t0 = time.time()
            r = run_one(m, size, args)
            results[size][m] = r
            shown = {k: r[k] for k in ("time", "peak", "first", "error", "skipped") if k in r}
            print(f"{size} {m}: {shown} ({time.time() - t0:.0f} s)", flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"fused-{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = {f"{n}x{h}x{v}": res for (n, h, v), res in results.items()}
    out.with_suffix(".json").write_text(json.dumps({"machine": header, "results": raw}, indent=1))
    md = table(results, sizes)
    print(md)
    text = (
        f"# Fused policy loss benchmark ({args.device}, {args.dtype})\n\n"
        f"Machine: {header}.\nLiger-Kernel {liger_version()}. Command: `python benchmarks/fused.py "
        f"--sizes {args.sizes} --reps {args.reps} --dtype {args.dtype} --device {args.device}`; "
        f"total wall time {time.time() - t_start:.0f} s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
        "Forward + backward of the DAPO loss (token-mean, clip 0.2/0.28, old_logp given) on B = 8 full rows; "
        f"median of {args.reps} timed calls after one warm-up call, each method in its own process. "
        "`x matmul floor`: median time / median of the three bare products (`h W^T`, `dlogits W`, "
        "`dlogits^T h`, preallocated outputs) timed in the same process, interleaved with the method's calls "
        "(robust to other load on the machine); the `floor` row times them alone. "
        "Peak memory increment: peak RSS during a call minus RSS before it, max over the timed calls "
        "(gradients included). `x Liger`: time ratio, and in parentheses the ratio of the floor-normalised "
        "times (each method over the floor timed in its own process), less sensitive to load that changed "
        "between processes. `vs logits path`: relative difference of the loss and of the gradient norms "
        f"(warm-up call). Liger-Kernel runs with chunk_size {args.liger_chunk}.\n\n" + md + "\n"
    )
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
