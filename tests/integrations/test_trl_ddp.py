"""``DrGRPOTrainer.train()`` on two gloo processes (accelerate ``MULTI_CPU``): the single-process whole-batch gradient.

Each rank generates its share of every generation batch (TRL deals the rows out in contiguous slices, so
with 2 completions per process a group of 4 straddles the processes), accumulates its K micro-batches,
and DDP averages the gradients. The oracle is one process, the whole step's rows from both ranks in one
batch, advantages from the test's own rewards (``trl_harness``). The two processes run every test's jobs in one
launch (``ranks``, once per module: a launch costs two interpreter starts); each test reads its own jobs' records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trl_harness as h

PRESETS = ["dr_grpo", "dapo", "bnpo", "grpo"]
SPLITS = [(1, 1), (2, 1), (4, 2), (2, 4)]  # (K, spg); 2 completions per process per micro-step


def whole_batch_jobs() -> list[dict]:
    """Every preset and split, and the fused loss on the presets with and without KL where K > 1."""
    jobs = [
        {"trainer": "drgrpo", "loss_config": preset, "k": k, "spg": spg, "per_device": 2}
        for preset in PRESETS
        for k, spg in SPLITS
    ]
    # the fused loss runs inside DDP's forward (forward redirection): DDP must still average its gradients
    return jobs + [{**job, "fused": True} for job in jobs if job["loss_config"] in ("dr_grpo", "grpo") and job["k"] > 1]


def entropy_jobs() -> list[dict]:
    """dr_grpo with the high-entropy mask and the entropy bonus, K = 4, spg = 2; on the logits path and fused."""
    job = {"trainer": "drgrpo", "loss_config": "dr_grpo", "k": 4, "spg": 2, "per_device": 2}
    job.update(top_entropy_quantile=0.5, entropy_coef=0.05)
    return [job, {**job, "fused": True}]


def estimator_jobs() -> list[dict]:
    """The batch-wide outcome estimators gpg and opo, K = spg = 1."""
    return [
        {"trainer": "drgrpo", "loss_config": "dr_grpo", "k": 1, "spg": 1, "per_device": 2, "advantage": name}
        for name in ("gpg", "opo")
    ]


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[list[dict]]]]:
    """One launch of two processes running every test's jobs: the model directory and, per group of jobs, the
    ``[rank][job]`` records (read-only)."""
    root = tmp_path_factory.mktemp("ddp")
    model_dir = h.save_tiny_model(root / "tiny")
    groups = {"whole": whole_batch_jobs(), "entropy": entropy_jobs(), "estimators": estimator_jobs()}
    return model_dir, h.run_rank_groups(groups, model_dir, 2, root / "ranks")


@pytest.mark.slow
def test_two_processes_give_the_whole_batch_gradient(launch: tuple[Path, dict[str, list[list[dict]]]]) -> None:
    model_dir, records = launch
    jobs, ranks = whole_batch_jobs(), records["whole"]
    worst = 0.0
    for j, job in enumerate(jobs):
        k = job["k"]
        loss, grads, rollout = h.whole_batch_of_ranks(
            [r[j] for r in ranks], h.preset_config(job["loss_config"]), model_dir, k
        )
        assert rollout.mask.shape[0] == 2 * 2 * k  # both processes' rows
        for rank, r in enumerate(ranks):
            diff = h.relative_difference(r[j]["grads"][0], grads)
            assert diff <= 1e-5, f"{job}: rank {rank} gradient differs from the whole batch's by {diff:.3g}"
            worst = max(worst, diff)
        # each process's losses are its share times P: their sum over both processes is twice the whole loss
        total = sum(float(x) for r in ranks for x in r[j]["losses"][:k])
        assert abs(total - 2 * float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))
    print(f"P = 2: largest relative gradient difference from the whole batch {worst:.3g}")


@pytest.mark.slow
def test_the_entropy_mask_and_bonus_on_two_processes_give_the_whole_batch_gradient(
    launch: tuple[Path, dict[str, list[list[dict]]]],
) -> None:
    """dr_grpo with top_entropy_quantile = 0.5 and entropy_coef = 0.05: one threshold over both processes' tokens of
    the step, the bonus over the step's tokens, so K = 4 with spg = 2 on P = 2 is the one-batch gradient."""
    model_dir, records = launch
    jobs, ranks = entropy_jobs(), records["entropy"]
    config = h.preset_config("dr_grpo").replace(top_entropy_quantile=0.5, entropy_coef=0.05)
    for j in range(len(jobs)):
        _, grads, rollout = h.whole_batch_of_ranks([r[j] for r in ranks], config, model_dir, 4)
        assert rollout.mask.shape[0] == 2 * 2 * 4
        for rank, r in enumerate(ranks):
            diff = h.relative_difference(r[j]["grads"][0], grads)
            assert diff <= 1e-5, f"{jobs[j]}: rank {rank} gradient differs from the whole batch's by {diff:.3g}"


@pytest.mark.slow
def test_advantage_estimators_on_two_processes_see_the_whole_generation_batch(
    launch: tuple[Path, dict[str, list[list[dict]]]],
) -> None:
    """advantage="gpg" (its alpha counts the whole batch's nonzero rewards) and "opo" (length weights, a group split
    over the processes): both ranks' advantages are the float64 oracle's of every rank's rewards and lengths."""
    from drgrpo import reference
    from drgrpo.train.loop.tiny import build_tokenizer

    jobs, ranks = estimator_jobs(), launch[1]["estimators"]
    tokenizer = build_tokenizer()
    for j, job in enumerate(jobs):
        outs = [r[j]["generations"][0][1] for r in ranks]  # process order: TRL's gather order
        ids = torch.cat([o["completion_ids"] for o in outs])
        mask = torch.cat([o["completion_mask"] for o in outs])
        texts = [tokenizer.decode(i[m.bool()].tolist(), skip_special_tokens=True) for i, m in zip(ids, mask)]
        rewards = h.digit_reward(texts)
        want = reference.oracle_outcome_advantages(rewards, h.G, job["advantage"], lengths=mask.sum(1).tolist())
        got = torch.cat([o["advantages"] for o in outs]).double()
        assert len(rewards) == 2 * 2 and torch.allclose(got, torch.as_tensor(want), rtol=1e-6, atol=1e-6), job
        local = reference.oracle_outcome_advantages(rewards[:2], 2, job["advantage"], lengths=mask.sum(1)[:2].tolist())
        assert float(torch.as_tensor(want[:2] - local).abs().max()) > 1e-3  # one process's rows alone would differ
