"""Several gloo processes on one CPU machine, robustly: each rank a fresh interpreter, a file rendezvous.

Used by the tests (``tests/test_distributed.py``, the TRL two-process tests) and by the benchmarks
(``trl_harness.run_ranks``); pyproject.toml's pytest ``pythonpath`` puts this folder on the tests' import path.

Each rank is its own ``python`` process (not a fork of the pytest process, whose OpenMP and OpenBLAS
thread pools are already running, nor of a forkserver that has imported them), pinned to one thread and
to the loopback interface, with a file rendezvous (no port to pick). A rank that is stuck dumps its
stacks to its log (it enables ``faulthandler`` itself), the parent kills what is left after the timeout,
and the failure message carries every failed rank's log. A rank leaves through :func:`leave` once its
results are saved: gloo's worker threads can still hold tensors when an interpreter finalises, and a
finished rank then aborted at exit ("terminate called without an active exception") in 3 of about 100
runs here; ``os._exit`` skips that, as ``multiprocessing`` children do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def launch(module: str, entry: str, world_size: int, out_dir: Path, extra: list[str], timeout_s: float) -> None:
    """Run ``module.entry([rank, world_size, rendezvous_file, out_dir, *extra])`` on ``world_size`` processes.

    ``module`` must be importable here; its directory and this module's go on the ranks' PYTHONPATH. Raises
    AssertionError with the failed ranks' logs when a rank exits non-zero or does not finish within ``timeout_s``.
    """
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"cannot find module {module!r}"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        **({"GLOO_SOCKET_IFNAME": "lo"} if sys.platform == "linux" else {}),
        # the module's directory, and this one's (the ranks import leave() from here)
        "PYTHONPATH": os.pathsep.join(
            [str(Path(spec.origin).parent), str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    code = f"import sys, {module}; {module}.{entry}(sys.argv[1:])"
    logs = [out_dir / f"rank{rank}.log" for rank in range(world_size)]
    processes = []
    for rank in range(world_size):
        argv = [str(rank), str(world_size), str(out_dir / "rendezvous"), str(out_dir), *extra]
        with open(logs[rank], "wb") as log:
            processes.append(
                subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    deadline = time.monotonic() + timeout_s
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
    report = "\n".join(f"--- rank {r} (exit {processes[r].returncode}):\n{logs[r].read_text()[-4000:]}" for r in failed)
    assert not failed, (
        f"{world_size} gloo processes: ranks {failed} failed or did not finish in {timeout_s} s\n{report}"
    )


def leave() -> None:
    """End a rank's interpreter after its results are saved (see the module docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
