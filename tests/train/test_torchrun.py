"""``torchrun --nproc-per-node 2 -m drgrpo train`` on CPU with gloo (DDP), tiny settings."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drgrpo.train.loop.task import TaskConfig, make_splits
from helpers.cli_runs import TINY, torchrun  # TINY: the same tiny flags as the single-process smoke test


def test_two_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # a dense reward (shorter is better) so that every group has a signal even for an untrained tiny model
    # it also records, per process, the prompts it scored: the ranks' shares of every step must be disjoint
    reward = (
        "import json, os\n"
        "def shorter(completion, example):\n"
        f"    with open(os.path.join({str(tmp_path)!r}, 'seen_' + os.environ['RANK']), 'a') as f:\n"
        "        f.write(json.dumps(example['prompt']) + '\\n')\n"
        "    return -len(completion.split())\n"
    )
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
    returncode, err = torchrun(cmd, env)
    assert returncode == 0, err[-3000:]
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
    # each rank scored its own prompts: 2 prompts x G = 4 completions per step, 3 steps, and evaluations
    # (4 held-out prompts per rank, greedy and sampled, at steps 0 and 3); the training prompts are disjoint
    seen = [(tmp_path / f"seen_{rank}").read_text().splitlines() for rank in (0, 1)]
    held_out = {json.dumps(e["prompt"]) for e in make_splits(TaskConfig(max_operand=9, max_work=2, num_eval=20))[1]}
    train_seen = [[p for p in lines if p not in held_out] for lines in seen]
    assert len(train_seen[0]) == len(train_seen[1]) == 3 * 2 * 4
    for step in range(3):
        share = [set(lines[step * 8 : (step + 1) * 8]) for lines in train_seen]
        assert len(share[0]) == len(share[1]) == 2 and not share[0] & share[1]
    assert not list(ckpt.glob("rng_*"))  # no random-number state: every step reseeds from (seed, step, rank)
    # RL moved the weights away from the warm start (gradients were synchronised: the run would deadlock
    # or the replicas would diverge otherwise; DDP checks parameter shapes at construction)
    w0 = load_file(str(run / "warm_start" / "model.safetensors"))
    w3 = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(w0[k], w3[k]) for k in w0)


ONE_RANK_FAILS = """
import os
from drgrpo.train.loop.task import exact_match

CALLS = 0


def right(completion, example):
    global CALLS
    CALLS += 1
    if os.environ["RANK"] == "1" and CALLS == 2 * 8 + 1:  # rank 1's first completion of step 3 (8 a step)
        raise KeyError("no such field")
    return exact_match(completion, example)
"""


@pytest.mark.parametrize("every", ["0", "2"])
def test_a_reward_failing_on_one_process_stops_both_after_saving(tmp_path: Path, every: str) -> None:
    # rank 1's reward raises at step 3; rank 0's would go on to the step's collectives and wait forever. Both
    # must stop at the same point with the last completed step (2) on disk: saved after the failure when
    # checkpoints are off, already there (and not saved again: the processes must agree on that, or one waits
    # for the other forever) with a checkpoint every 2 steps. The timeout below is the test's hang detector.
    (tmp_path / "one_rank_fails.py").write_text(ONE_RANK_FAILS)
    run = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "drgrpo",
           "train", "--output-dir", str(run), "--steps", "4", "--eval-every", "0", "--checkpoint-every", every, *TINY,
           "--reward", "one_rank_fails:right"]  # fmt: skip
    returncode, err = torchrun(cmd, env)
    assert returncode != 0
    assert "reward one_rank_fails:right raised KeyError: 'no such field'" in err  # rank 1's own error
    assert "process 1 of 2 failed (see its error); every process stopped at the same point" in err  # rank 0 too
    assert "step 3 failed (FailedElsewhere); the last completed step is saved in" in err  # rank 0 saved it
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_000002"]
    state = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
