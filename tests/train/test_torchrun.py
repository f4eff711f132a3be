"""``torchrun --nproc-per-node 2 -m drgrpo train`` on CPU with gloo (DDP), tiny settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_cli import TINY  # the same tiny flags as the single-process smoke test


def test_two_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # a dense reward (shorter is better) so that every group has a signal even for an untrained tiny model
    reward = "def shorter(completion, example):\n    return -len(completion.split())\n"
    (tmp_path / "dense_reward.py").write_text(reward)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "drgrpo",
        "train",
        "--output-dir",
        str(run),
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "1",
        "--ppo-epochs",
        "2",
        *TINY,
        "--micro-batch-size",
        "4",
        "--reward",
        "dense_reward:shorter",
    ]
    # own session: on a timeout the whole process group (torchrun and both workers) is killed, no orphans
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "reward" in r]
    evals = [r for r in lines if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # one line per step: rank 0 logs, the others do not
    assert [r["step"] for r in evals] == [0, 3]
    assert all(r["eval/num_prompts"] == 8 for r in evals)  # each rank evaluated half, the sums were reduced
    assert all(-r["eval/length"] <= r["eval/reward"] <= -r["eval/length"] + 1 for r in evals)  # EOS or not
    ckpt = run / "checkpoints" / "step_000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    r0 = torch.load(ckpt / "rng_rank0.pt", weights_only=False)["torch"]
    r1 = torch.load(ckpt / "rng_rank1.pt", weights_only=False)["torch"]
    assert not torch.equal(r0, r1)  # the ranks sampled different completions
    # RL moved the weights away from the warm start (gradients were synchronised: the run would deadlock
    # or the replicas would diverge otherwise; DDP checks parameter shapes at construction)
    w0 = load_file(str(run / "warm_start" / "model.safetensors"))
    w3 = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(w0[k], w3[k]) for k in w0)
