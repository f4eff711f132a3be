"""``DrGRPOTrainer.train()`` with the model sharded over two gloo processes on a CPU: FSDP2 and DeepSpeed ZeRO-3.

As in ``test_trl_ddp``, each rank generates its share of the rows, accumulates its K micro-batches and the
sharding engine averages the gradients; the gradient of the first optimizer step, gathered from the shards,
must equal the single-process gradient of the whole step's rows (``trl_harness.whole_batch_of_ranks``). How
each engine is set up on a CPU, and why not through accelerate's FSDP plugin, is in ``sharding.py``; each run
also records that its parameters really were sharded and in what state the loss found ``lm_head``.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trl_harness as h

TOL = 1e-5  # relative, float32 (measured 2e-7 to 3e-7)
PER_DEVICE = 2  # completions per process per micro-step
FREE_HEAD = {"lm_head": "free_full_weight"}  # FSDP2 plan: lm_head a group of its own, resharded after its forward


def check(job: dict, records: list[dict], model_dir: Path) -> float:
    """The job's first step on both ranks against the whole batch; returns the largest relative difference."""
    k = job["k"]
    loss, grads, rollout = h.whole_batch_of_ranks(records, h.preset_config(job["loss_config"]), model_dir, k)
    assert rollout.mask.shape[0] == 2 * PER_DEVICE * k  # both processes' rows
    assert int(rollout.mask.sum(1).min()) < int(rollout.mask.sum(1).max())  # ragged: the counts matter
    worst = 0.0
    for rank, r in enumerate(records):
        diff = h.relative_difference(r["grads"][0], grads)
        assert diff <= TOL, f"{job}: rank {rank} gradient differs from the whole batch's by {diff:.3g}"
        worst = max(worst, diff)
    # each process's losses are its share times P: their sum over both processes is twice the whole loss
    total = sum(float(x) for r in records for x in r["losses"][:k])
    assert abs(total - 2 * float(loss)) <= TOL * max(1.0, abs(float(loss)))
    return worst


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def fsdp2_jobs() -> list[dict]:
    common = {"trainer": "drgrpo", "per_device": PER_DEVICE}
    jobs = [
        # the fused loss, lm_head sharded when the loss needs it (the adapter gathers it through its group)
        {**common, "loss_config": "dr_grpo", "k": 2, "spg": 2, "fused": True, "fsdp2": FREE_HEAD, "model": "untied"},
        # the fused loss, transformers' own plan (lm_head kept gathered; tied to the embedding), KL to a reference
        {**common, "loss_config": "grpo", "k": 2, "spg": 4, "fused": True, "fsdp2": {}, "model": "tied"},
        # the logits path (TRL's head) with lm_head sharded
        {**common, "loss_config": "dapo", "k": 2, "spg": 1, "fused": False, "fsdp2": FREE_HEAD, "model": "untied"},
    ]
    # The check can fail: stock TRL's head takes lm_head.weight.full_tensor(), whose gradient is each
    # process's own, never averaged (K = 1: TRL's per-micro-batch dr_grpo is then the whole step's).
    stock = {"trainer": "stock", "loss_type": "dr_grpo", "k": 1, "spg": 1}
    return [*jobs, {**stock, "per_device": PER_DEVICE, "fsdp2": FREE_HEAD, "model": "untied"}]


def zero3_jobs() -> list[dict]:
    common = {"trainer": "drgrpo", "per_device": PER_DEVICE, "zero3": True}
    return [
        # the fused loss: lm_head's own ZeRO-3 partition is gathered for it (maybe_gather_lm_head_ctx)
        {**common, "loss_config": "dr_grpo", "k": 2, "spg": 2, "fused": True, "model": "untied"},
        # the logits path, KL to a reference model (TRL builds it as a ZeRO-3 inference engine)
        {**common, "loss_config": "grpo", "k": 2, "spg": 1, "fused": False, "model": "untied"},
    ]


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, list[list[dict]]]]:
    """One launch of two processes running both engines' jobs, FSDP2's then ZeRO-3's (each job sets up its own
    engine, ``sharding.setup``; a launch costs two interpreter starts): the model directories and, per engine,
    the ``[rank][job]`` records (read-only). Without DeepSpeed only FSDP2's jobs run (the ZeRO-3 test fails)."""
    root = tmp_path_factory.mktemp("sharded")
    models = {"tied": h.save_tiny_model(root / "tied"), "untied": h.save_tiny_model(root / "untied", tied=False)}

    def on_disk(job: dict) -> dict:  # the job's model by its directory
        return {**{k: v for k, v in job.items() if k != "model"}, "model_dir": str(models[job["model"]])}

    engines = {"fsdp2": fsdp2_jobs(), "zero3": zero3_jobs() if HAS_DEEPSPEED else []}
    groups = {name: [on_disk(job) for job in jobs] for name, jobs in engines.items()}
    return models, h.run_rank_groups(groups, models["tied"], 2, root / "ranks")


@pytest.mark.slow
def test_fsdp2_gives_the_whole_batch_gradient(launch: tuple[dict[str, Path], dict[str, list[list[dict]]]]) -> None:
    models, records = launch
    jobs, ranks = fsdp2_jobs(), records["fsdp2"]
    worst = 0.0
    for j, job in enumerate(jobs[:3]):
        job_records = [r[j] for r in ranks]
        for r in job_records:  # every parameter a DTensor holding half the rows
            assert r["layout"]["dtensor"] == r["layout"]["params"] > 0, r["layout"]
        head = {state.split(" ")[0] for r in job_records for state in r["head"]}
        assert head == ({"DTensor"} if job["fsdp2"] == FREE_HEAD else {"full"}), (job, head)
        worst = max(worst, check(job, job_records, models[job["model"]]))

    stock_records = [r[3] for r in ranks]
    _, grads, _ = h.whole_batch_of_ranks(stock_records, h.preset_config("trl.dr_grpo"), models["untied"], 1)
    rest = {n: g for n, g in grads.items() if n != "lm_head.weight"}
    assert h.relative_difference(stock_records[0]["grads"][0], rest) <= TOL  # the backbone is right...
    head_diff = h.relative_difference(stock_records[0]["grads"][0], {"lm_head.weight": grads["lm_head.weight"]})
    assert head_diff > 0.1  # ...lm_head's gradient is not averaged over the processes
    print(f"FSDP2, P = 2: largest relative difference {worst:.3g}; stock TRL's lm_head gradient {head_diff:.3g}")


@pytest.mark.slow
def test_deepspeed_zero3_gives_the_whole_batch_gradient(
    launch: tuple[dict[str, Path], dict[str, list[list[dict]]]],
) -> None:
    if not HAS_DEEPSPEED:  # CI installs it: a missing DeepSpeed fails, not skips
        pytest.fail("DeepSpeed is not installed: bash scripts/setup.sh train,trl,peers,dev,verl,deepspeed")
    models, records = launch
    jobs, ranks = zero3_jobs(), records["zero3"]
    worst = 0.0
    for j, job in enumerate(jobs):
        job_records = [r[j] for r in ranks]
        for r in job_records:  # every parameter partitioned: each process holds part of it
            assert r["layout"]["zero3"] == r["layout"]["params"] > 0, r["layout"]
        if job["fused"]:  # (later calls find it gathered: ZeRO-3 fetches it with the root module from then on)
            assert all(r["head"][0].startswith("ZeRO-3 partition") for r in job_records), job_records[0]["head"]
        worst = max(worst, check(job, job_records, models[job["model"]]))
    print(f"DeepSpeed ZeRO-3, P = 2: largest relative difference from the whole batch {worst:.3g}")


def test_a_sharded_head_that_no_fsdp_group_gathers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DTensor lm_head outside any fully_shard group: an error, not a gradient that is never averaged."""
    import drgrpo.integrations.trl as adapter

    head = torch.nn.Linear(4, 3, bias=False)
    monkeypatch.setattr(adapter, "_is_dtensor", lambda x: x is head.weight)  # as if sharded, by no FSDP group
    with pytest.raises(ValueError, match=r"lm_head.s full weight .* DTensor .* no fully_shard group"):
        adapter._unshard_fsdp2_head(torch.nn.Sequential(head), head)
    adapter._unshard_fsdp2_head(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.nn.Linear(4, 3))  # plain: nothing


ROOT_GROUP_HEAD = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
from drgrpo.integrations.trl import _is_dtensor, _unshard_fsdp2_head
from drgrpo.train.loop.tiny import TinyModelConfig, build_model, build_tokenizer

def untied():
    model = build_model(TinyModelConfig(), build_tokenizer(), seed=0)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model

whole = untied()
ids = torch.randint(0, whole.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
whole(input_ids=ids).logits.log_softmax(-1).sum().backward()
sharded = untied()
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded)  # lm_head in the root's group, as a hand-written wrapping leaves it
assert _is_dtensor(sharded.lm_head.weight)  # before the root's forward: sharded
_unshard_fsdp2_head(sharded, sharded.lm_head)  # where the logits path calls it
assert not _is_dtensor(sharded.lm_head.weight)
sharded(input_ids=ids).logits.log_softmax(-1).sum().backward()
grad = sharded.lm_head.weight.grad.full_tensor()
print(float((grad - whole.lm_head.weight.grad).abs().max() / whole.lm_head.weight.grad.abs().max()))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_head_in_the_root_group_is_gathered_before_the_roots_forward() -> None:
    """fully_shard on the layers and the root only: the logits path gathers lm_head through the root's group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", ROOT_GROUP_HEAD, str(port)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) <= TOL  # the gradient of the unsharded model
