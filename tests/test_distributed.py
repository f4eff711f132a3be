"""P = 3 gloo processes on CPU, uneven micro-batches, DistributedDataParallel: the whole batch's gradient.

Each process holds whole groups (a different number per process: 1, 3 and 2), splits them into uneven
micro-batches of different widths, computes its advantages with ``global_group_advantages``,
builds one ``StepNormalizer`` for the step and accumulates gradients under ``no_sync``. The
oracle is the single-process gradient of the whole batch's loss, computed in the parent. Three
processes, not two: the process that splits a group (rank 1) has a process on either side. The
processes run once per module (``ranks``); each test reads what they saved.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from drgrpo import LossConfig, StepNormalizer, group_advantages, policy_loss, reference
from drgrpo.config import AGGREGATIONS
from drgrpo.distributed import global_group_advantages, global_outcome_advantages
from gloo_ranks import launch, leave
from helpers.normalizer_steps import (
    L,
    Micro,
    Step,
    aggregation_config,
    gradients,
    make_model,
    make_step,
    max_diff,
    preset_config,
    token_logp,
    whole_batch,
)

GROUP_SIZE = 3
GROUPS_PER_PROCESS = {3: [1, 3, 2]}  # uneven on purpose
MICRO_SIZES = {1: [3], 2: [1, 5], 3: [4, 3, 2]}  # rows of each micro-batch, by a process's number of groups
TIMEOUT_S = 300  # a hang, not slowness, is what this catches: each run takes seconds
RANK_TIMEOUT_S = 240  # a stuck rank dumps its stacks after this long, before the parent gives up


def configs() -> dict[str, LossConfig]:
    out = {f"preset-{p}": preset_config(p) for p in ("dr_grpo", "grpo", "dapo", "gspo", "cispo")}
    out.update({a: aggregation_config(a) for a in AGGREGATIONS})
    out["batch-std"] = LossConfig(
        aggregation="token-mean", advantage_std="batch", std_eps=1e-4, max_completion_length=L, name="batch-std"
    )
    out["batch-std-population-threshold"] = out["batch-std"].replace(
        std_unbiased=False, std_zero_threshold=1e-8, aggregation="seq-mean-token-sum-norm"
    )
    return out


def step_of(name: str, config: LossConfig, num_groups: int) -> Step:
    seed = 100 + sorted(configs()).index(name)
    scale = 2e-4 if config.ratio_level == "sequence" else 0.3
    return make_step(seed, num_groups=num_groups, group_size=GROUP_SIZE, ratio_scale=scale)


def process_rows(world_size: int, rank: int) -> slice:
    groups = GROUPS_PER_PROCESS[world_size]
    start = sum(groups[:rank]) * GROUP_SIZE
    return slice(start, start + groups[rank] * GROUP_SIZE)


# --------------------------------------------------------------------------- one process


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    faulthandler.enable()  # a crash leaves its Python stack in the log
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)  # and so does a hang
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=RANK_TIMEOUT_S // 2),  # a lost peer raises instead of blocking forever
    )
    try:
        results: dict[str, dict] = {}
        num_groups = sum(GROUPS_PER_PROCESS[world_size])
        mine = process_rows(world_size, rank)
        model = make_model(0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # once: constructing DDP costs ~0.3 s
        for name, config in configs().items():
            step = step_of(name, config, num_groups)
            with torch.no_grad():  # this config's initial weights, identical on every process
                for p, init in zip(model.parameters(), make_model(step.model_seed).parameters()):
                    p.copy_(init)
                    p.grad = None
            # Advantages: this process's whole groups, batch statistics over all processes.
            adv = global_group_advantages(step.rewards[mine], GROUP_SIZE, config)
            # Uneven micro-batches of this process's rows, each with its own width T_k.
            micros, start = [], mine.start
            for k, size in enumerate(MICRO_SIZES[GROUPS_PER_PROCESS[world_size][rank]]):
                rows = slice(start, start + size)
                micros.append(Micro(rows, max(int(step.lengths[rows].max()), 1) + k))
                start += size
            assert start == mine.stop
            norm = StepNormalizer.from_masks([step.mask(m.rows, m.width) for m in micros], config)
            assert norm.world_size == world_size
            for k, m in enumerate(micros):
                r, t = m.rows, m.width
                local = slice(r.start - mine.start, r.stop - mine.start)
                sync = k == len(micros) - 1  # DDP all-reduces the accumulated gradient once, at the last backward
                with ddp.no_sync() if not sync else contextlib.nullcontext():
                    logp = token_logp(ddp, step.x[r, :t], step.y[r, :t])
                    ref = step.ref_logp[r, :t] if config.beta > 0 else None
                    loss = policy_loss(
                        logp, step.old_logp[r, :t], adv[local], step.mask(r, t), config, ref_logp=ref, normalizer=norm
                    ).loss
                    loss.backward()
            results[name] = {
                "grad": gradients(model),
                "adv": adv,
                "num_tokens": int(norm.num_tokens),
                "num_sequences": int(norm.num_sequences),
            }

        # Outcome estimators: the batch-wide ones (gpg, reinforce_plus_plus_baseline) gather every process's rows
        rows = step_of("preset-grpo", configs()["preset-grpo"], num_groups)
        results["outcome"] = {
            name: global_outcome_advantages(
                rows.rewards[mine], GROUP_SIZE, configs()["preset-grpo"], name, lengths=rows.lengths[mine]
            )
            for name in ("gpg", "reinforce_plus_plus_baseline", "rloo")
        }

        # Groups split across processes are refused clearly, by every process (no hang in the all-reduce).
        bad = step.rewards[: 2 * GROUP_SIZE + (1 if rank == 1 else 0)]
        errors = {}
        for name in ("batch-std", "preset-grpo"):
            try:
                global_group_advantages(bad, GROUP_SIZE, configs()[name])
                errors[name] = None
            except ValueError as error:
                errors[name] = str(error)
        results["errors"] = errors
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _main(argv: list[str]) -> None:
    """Entry point of one rank's interpreter: ``rank world_size init_file out_dir`` (see ``gloo_ranks``)."""
    _worker(int(argv[0]), int(argv[1]), argv[2], argv[3])
    leave()


def run_processes(world_size: int, tmp_path: Path) -> list[dict]:
    """``world_size`` fresh gloo interpreters running ``_worker`` (``gloo_ranks.launch``); what each saved."""
    launch("test_distributed", "_main", world_size, tmp_path, [], TIMEOUT_S)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


# --------------------------------------------------------------------------- the tests

WORLD_SIZE = 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the ``WORLD_SIZE`` processes saved (read-only): one launch serves every test below."""
    return run_processes(WORLD_SIZE, tmp_path_factory.mktemp("ranks"))


@pytest.mark.slow
def test_ddp_with_uneven_micro_batches_gives_the_whole_batch_gradient(ranks: list[dict]) -> None:
    world_size, results = WORLD_SIZE, ranks
    num_groups = sum(GROUPS_PER_PROCESS[world_size])
    worst_grad, worst_adv = 0.0, 0.0
    for name, config in configs().items():
        step = step_of(name, config, num_groups)
        _, whole_grad = whole_batch(step, config)  # the oracle: one process, the whole batch
        whole_adv = group_advantages(step.rewards, GROUP_SIZE, config)
        assert max(float(g.abs().max()) for g in whole_grad) > 1e-3
        for rank, result in enumerate(results):
            got = result[name]
            diff = max_diff(got["grad"], whole_grad)
            assert diff <= 1e-10, f"{name}, rank {rank}: gradient differs by {diff}"
            adv_diff = float((got["adv"] - whole_adv[process_rows(world_size, rank)]).abs().max())
            assert adv_diff <= 1e-12, f"{name}, rank {rank}: advantages differ by {adv_diff}"
            assert got["num_sequences"] == step.num_rows
            assert got["num_tokens"] == int(step.lengths.sum())
            worst_grad, worst_adv = max(worst_grad, diff), max(worst_adv, adv_diff)
    print(f"P={world_size}: max |grad - whole| = {worst_grad:.3g}, max |adv - whole| = {worst_adv:.3g}")

    for rank, result in enumerate(results):
        errors = result["errors"]
        # batch std: a collective check, so EVERY process raises (the bad one with the explanation).
        assert errors["batch-std"] is not None
        if rank == 1:
            assert "groups must be whole on a process" in errors["batch-std"]
            assert "process 1 of" in errors["batch-std"]
            assert "groups must be whole on a process" in errors["preset-grpo"]
        else:
            assert "other process" in errors["batch-std"]
            assert errors["preset-grpo"] is None  # group std: local, nothing to wait for


@pytest.mark.slow
def test_outcome_estimators_over_processes_are_the_whole_batchs(ranks: list[dict]) -> None:
    # every process's slice of the whole batch's advantages, against the float64 loop oracle on the whole batch
    results = ranks
    step = step_of("preset-grpo", configs()["preset-grpo"], sum(GROUPS_PER_PROCESS[WORLD_SIZE]))
    for name in ("gpg", "reinforce_plus_plus_baseline", "rloo"):
        got = torch.cat([r["outcome"][name] for r in results])
        want = reference.oracle_outcome_advantages(step.rewards.numpy(), GROUP_SIZE, name, lengths=step.lengths.numpy())
        torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-12, atol=1e-12)


def test_global_group_advantages_without_a_process_group_is_group_advantages() -> None:
    rewards = torch.randn(12, dtype=torch.float64)
    for std in ("none", "group", "batch"):
        config = LossConfig(advantage_std=std, std_eps=1e-6)
        got = global_group_advantages(rewards, 4, config)
        assert torch.allclose(got, group_advantages(rewards, 4, config), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="groups must be whole"):
        global_group_advantages(rewards[:10], 4, LossConfig(advantage_std="batch"))
