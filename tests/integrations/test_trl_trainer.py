"""``DrGRPOTrainer.train()`` run for real (TRL 1.16, CPU, float32, the tiny Llama) against independent oracles.

The gradient of an optimizer step, read just before the optimizer steps, must equal the gradient of
drgrpo's loss over the whole step computed in one batch with no TRL code (``trl_harness.whole_batch_gradient``),
whatever the gradient accumulation K and ``steps_per_generation`` (spg); ``trl.*`` presets must give stock
``GRPOTrainer``'s numbers on the same rollout; the fused loss the logits path's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer

import trl_harness as h
from drgrpo import LossConfig
from drgrpo.integrations.trl import DrGRPOTrainer
from drgrpo.train.tiny import build_tokenizer

TOL = 1e-5  # relative, float32: measured 1e-7 to 3e-7
SPLITS = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (4, 4)]  # (K, spg): spg equal to, below and above K


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.save_tiny_model(tmp_path_factory.mktemp("tiny"))


def check_step(trainer, model_dir: Path, k: int, step: int = 0, *, off_policy: bool = False) -> dict:
    """Step ``step``'s gradient and summed loss against the whole-batch oracle; returns the oracle's metrics."""
    config = trainer.loss_config
    micro = trainer.micro[step * k : (step + 1) * k]
    assert len(micro) == k
    rollout = h.step_rollout(trainer.generations, micro, config, build_tokenizer())
    weights = trainer.step_params[step] if step else None
    loss, grads, metrics = h.whole_batch_gradient(model_dir, rollout, config, weights=weights, off_policy=off_policy)
    diff = h.relative_difference(trainer.step_grads[step], grads)
    assert diff <= TOL, f"{config.name}: gradient differs from the whole batch's by {diff:.3g} (relative)"
    got_loss = float(sum(trainer.losses[step * k : (step + 1) * k]))
    assert abs(got_loss - float(loss)) <= TOL * max(1.0, abs(float(loss))), (got_loss, float(loss))
    assert int(rollout.mask.sum(1).min()) < int(rollout.mask.sum(1).max())  # ragged: counts matter
    return metrics


# --------------------------------------------------------------------------- whole-step gradient


@pytest.mark.parametrize(("k", "spg"), SPLITS)
@pytest.mark.parametrize("preset", ["dr_grpo", "dapo", "bnpo", "grpo"])
def test_first_step_gradient_is_the_whole_batch_gradient(
    model_dir: Path, tmp_path: Path, preset: str, k: int, spg: int
):
    trainer = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path, k, spg), loss_config=preset)
    assert len(trainer.generations) == max(1, k // spg)  # spg < K: the window spans K / spg generation batches
    if preset == "dr_grpo":
        assert trainer.loss_config.max_completion_length == h.MAX_NEW  # L = max_completion_length
    if preset == "grpo":
        assert trainer.ref_model is not None  # beta = 0.04 reached TRL: it built the reference model
    check_step(trainer, model_dir, k)


def test_the_oracle_sees_per_micro_batch_normalisation(model_dir: Path, tmp_path: Path):
    """The check above can fail: TRL's per-micro-batch token mean (trl.bnpo) is not the step's token mean."""
    trainer = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path, 4, 4), loss_config="trl.bnpo")
    step_mean = LossConfig.preset("trl.dapo")  # the same advantages, token mean over the whole step
    rollout = h.step_rollout(trainer.generations, trainer.micro[:4], step_mean, build_tokenizer())
    _, grads, _ = h.whole_batch_gradient(model_dir, rollout, step_mean)
    assert h.relative_difference(trainer.first_step_grads, grads) > 1e-3


@pytest.mark.parametrize("preset", ["dapo", "grpo"])
def test_second_iteration_is_off_policy_and_exact(model_dir: Path, tmp_path: Path, preset: str):
    """num_iterations = 2: the second step reuses the rollout with old log-probs (ratio != 1) and, for grpo, the KL."""
    args = h.grpo_args(tmp_path, 2, 2, num_iterations=2, max_steps=2, learning_rate=3e-3)
    trainer = h.run(DrGRPOTrainer, model_dir, args, loss_config=preset)
    assert len(trainer.generations) == 1  # one rollout, two optimizer steps
    check_step(trainer, model_dir, 2, 0)
    metrics = check_step(trainer, model_dir, 2, 1, off_policy=True)
    assert abs(float(metrics["ratio_mean"]) - 1) > 1e-4  # the policy moved: the ratios are not 1
    if preset == "grpo":
        assert float(metrics["kl_mean"]) > 0
    logged = [row for row in trainer.state.log_history if "drgrpo/ratio_mean" in row]
    assert logged[0]["drgrpo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(logged[1]["drgrpo/ratio_mean"] - 1) > 1e-4  # (TRL logs the mean of the micro-batches' means)
    assert {"clip_ratio/low_mean", "clip_ratio/high_mean", "entropy"} <= set(logged[1])
    assert ("kl" in logged[1]) == (preset == "grpo")


# --------------------------------------------------------------------------- trl.* presets = stock TRL


@pytest.mark.parametrize(
    ("loss_type", "k", "spg"),
    [(t, 2, 2) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")]
    + [(t, k, spg) for t in ("grpo", "bnpo", "dr_grpo") for k, spg in ((2, 4), (4, 2))],
)
def test_trl_presets_give_stock_grpo_trainer_numbers(model_dir: Path, tmp_path: Path, loss_type: str, k: int, spg: int):
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "stock", k, spg, loss_type=loss_type))
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "ours", k, spg), loss_config=f"trl.{loss_type}")
    assert len(stock.generations) == len(ours.generations)
    for (_, a), (_, b) in zip(stock.generations, ours.generations):
        assert torch.equal(a["completion_ids"], b["completion_ids"])  # the same rollout
        assert torch.allclose(a["advantages"], b["advantages"], rtol=1e-5, atol=1e-6)
    for a, b in zip(stock.losses, ours.losses):
        assert abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(a)))
    assert h.relative_difference(ours.first_step_grads, stock.first_step_grads) <= TOL


def test_trl_grpo_with_kl_and_two_iterations_gives_stock_numbers(model_dir: Path, tmp_path: Path):
    """beta > 0 (k3 KL weighted by the ratio, TRL's use_bias_correction_kl) on an off-policy second step."""
    common = dict(num_iterations=2, max_steps=2, learning_rate=3e-3)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, loss_type="grpo", beta=0.04, **common))
    config = LossConfig.preset("trl.grpo", beta=0.04)
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2, **common), loss_config=config)
    assert h.relative_difference(ours.step_grads[0], stock.step_grads[0]) <= TOL  # same weights, same rollout
    assert abs(float(sum(ours.losses[:2])) - float(sum(stock.losses[:2]))) <= TOL
    for trainer in (stock, ours):  # the second step: each run's own weights, against the oracle (k3 x ratio)
        trainer.loss_config = config
        check_step(trainer, model_dir, 2, 1, off_policy=True)
    kl = [row["kl"] for row in ours.state.log_history if "kl" in row]
    stock_kl = [row["kl"] for row in stock.state.log_history if "kl" in row]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and stock_kl[0] == pytest.approx(0.0, abs=1e-7)
    assert kl[1] > 1e-3 and stock_kl[1] > 1e-3  # (TRL logs k3 * ratio, drgrpo the k3 estimate itself)


# --------------------------------------------------------------------------- fused


@pytest.mark.parametrize("preset", ["dr_grpo", "grpo", "gspo"])
def test_fused_equals_the_logits_path(model_dir: Path, tmp_path: Path, preset: str):
    common = dict(num_iterations=2, max_steps=2, learning_rate=3e-3)
    config = LossConfig.preset(preset, max_completion_length=h.MAX_NEW)
    if preset == "gspo":
        config = config.replace(clip_low=0.02, clip_high=0.02)  # some sequences clip on the second step
    a = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "a", 2, 2, **common), loss_config=config)
    b = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "b", 2, 2, **common), loss_config=config, fused=True)
    for (_, x), (_, y) in zip(a.generations, b.generations):
        assert torch.equal(x["completion_ids"], y["completion_ids"])
    for x, y in zip(a.losses[:2], b.losses[:2]):  # the first step: same weights
        assert abs(float(x) - float(y)) <= TOL * max(1.0, abs(float(x)))
    assert h.relative_difference(b.step_grads[0], a.step_grads[0]) <= TOL
    # The second step (old and reference log-probs, ratios clipped): after one Adam step the two runs' weights
    # differ by rounding, amplified where a gradient is near 0, so each is checked against the oracle at its weights.
    check_step(a, model_dir, 2, 1, off_policy=True)
    check_step(b, model_dir, 2, 1, off_policy=True)


# --------------------------------------------------------------------------- metrics

TRL_METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "entropy",
)


def test_metrics_have_trls_names_and_values(model_dir: Path, tmp_path: Path):
    """Stock TRL, DrGRPOTrainer and DrGRPOTrainer(fused=True) on the same rollout log the same TRL metrics.

    epsilon = 0.01 so that the second step (old log-probs from the first step's weights) clips; the second step's
    weights differ between the runs by rounding only.
    """
    fields = dict(loss_type="grpo", epsilon=0.01, num_iterations=2, max_steps=2, learning_rate=3e-3)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, **fields))
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2, **fields))
    fused = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "f", 2, 2, **fields), fused=True)
    rows = [[row for row in t.state.log_history if "entropy" in row] for t in (stock, ours, fused)]
    assert [len(r) for r in rows] == [2, 2, 2]
    for step in range(2):
        for key in TRL_METRICS:
            want = rows[0][step][key]
            for got in (rows[1][step][key], rows[2][step][key]):
                assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (step, key)
    assert rows[0][0]["clip_ratio/high_max"] == 0 and rows[0][1]["clip_ratio/high_max"] > 0  # the second step clips
    assert rows[0][1]["clip_ratio/high_max"] > rows[0][1]["clip_ratio/high_mean"] > 0  # one completion vs the mean
    assert rows[2][0]["entropy"] == pytest.approx(rows[1][0]["entropy"], rel=1e-6)  # same weights: float32 rounding


# --------------------------------------------------------------------------- the window and evaluation


def _args(tmp_path: Path, **overrides) -> GRPOConfig:
    return h.grpo_args(tmp_path, 1, 1, **overrides)


def test_a_micro_step_outside_the_fetched_window_raises(model_dir: Path, tmp_path: Path):
    trainer = DrGRPOTrainer(str(model_dir), h.digit_reward, _args(tmp_path), h.train_dataset(8))
    trainer.model.train()
    with pytest.raises(RuntimeError, match="not the next one of the accumulation window"):
        trainer._prepare_inputs([{"prompt": "1 2 + 3 4 =", "answer": "46"}] * 4)


def test_evaluation_runs_the_loss_on_its_own_batch(model_dir: Path, tmp_path: Path):
    args = _args(tmp_path, per_device_eval_batch_size=4, eval_strategy="no")
    trainer = DrGRPOTrainer(str(model_dir), h.digit_reward, args, h.train_dataset(8), eval_dataset=h.train_dataset(2))
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert "eval_drgrpo/ratio_mean" in metrics


# --------------------------------------------------------------------------- the extra missing


def test_import_without_trl_names_the_extra():
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class NoTRL(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "trl" or name.startswith("trl."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, NoTRL())
        try:
            import drgrpo.integrations.trl
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        import drgrpo  # the core does not need TRL
        print("CORE-OK", drgrpo.__version__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR: drgrpo.integrations.trl needs TRL" in out.stdout
    assert "from a clone of drgrpo, pip install -e '.[trl]'" in out.stdout
    assert "CORE-OK" in out.stdout


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_training_on_the_addition_task_raises_held_out_accuracy(tmp_path: Path):
    from datasets import Dataset

    from drgrpo.train import TaskConfig, WarmStartConfig, exact_match, make_splits, warm_start
    from drgrpo.train.warmstart import probe_accuracy

    task = TaskConfig()
    start = warm_start(tmp_path / "warm", WarmStartConfig(), task)  # ~25% greedy accuracy
    train, held_out = make_splits(task)
    tokenizer = build_tokenizer()

    def correct(completions, answer, **kwargs):
        return [exact_match(c, {"answer": a}) for c, a in zip(completions, answer)]

    args = h.grpo_args(
        tmp_path / "run",
        1,
        1,
        per_device=512,  # 64 prompts x G = 8, as drgrpo's own default run
        num_generations=8,
        max_completion_length=task.max_answer_tokens + task.max_work + 1,
        max_steps=40,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=10,
    )
    dataset = Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in train])
    trainer = DrGRPOTrainer(str(start), correct, args, dataset, processing_class=tokenizer, loss_config="dr_grpo")
    before = probe_accuracy(trainer.model, tokenizer, held_out, task)
    trainer.train()
    after = probe_accuracy(trainer.model, tokenizer, held_out, task)
    print(f"held-out greedy accuracy {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1, (before, after)
