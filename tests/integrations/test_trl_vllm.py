"""TRL's vLLM path on a CPU: ``use_vllm=True`` with a stand-in for TRL's vLLM generation object.

``trl_harness.StandInVLLM`` keeps TRL's ``VLLMGeneration.generate`` contract (prompt ids, completion ids, the sampled
tokens' log-probs), samples with the policy itself and reports each log-prob with a known error ``e`` (and none at
one position, as vLLM reports a token it could not score), so TRL builds its importance-sampling ratio exactly as
with vLLM. The ratio it must build is known without TRL: ``exp(-e)`` per token (``exp(-sum_t e)`` per completion),
1 where the sampler gave no log-prob, then truncated to or masked outside ``[clip_min, clip_max]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer

import trl_harness as h
from drgrpo.integrations.trl import DrGRPOTrainer
from drgrpo.train.loop.tiny import build_tokenizer

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
BOUNDS = {"vllm_importance_sampling_clip_min": 0.8, "vllm_importance_sampling_clip_max": 1.25}  # some ratios leave
UNSCORED = 2  # the sampler reports no log-prob for each completion's third token


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.save_tiny_model(tmp_path_factory.mktemp("tiny"))


def vllm_args(out: Path, k: int, spg: int, mode: str, **overrides):
    return h.grpo_args(out, k, spg, use_vllm=True, vllm_importance_sampling_mode=mode, **BOUNDS, **overrides)


def expected_ratio(completion_ids: torch.Tensor, mask: torch.Tensor, mode: str, amplitude: float) -> np.ndarray:
    """The ratio TRL must build, in float64 from the stand-in's known error: no TRL, no model."""
    ids, m = completion_ids.numpy(), mask.numpy().astype(bool)
    t = np.arange(ids.shape[1])
    error = amplitude * np.sin(1.7 * ids + 2.3 * t + 0.5)
    diff = np.where(m, -error, 0.0)
    diff[:, UNSCORED] = 0.0  # no sampling log-prob: TRL's NaN rule, ratio 1
    if mode.startswith("sequence"):
        diff = diff.sum(axis=1, keepdims=True)
    ratio = np.exp(diff)
    low, high = BOUNDS["vllm_importance_sampling_clip_min"], BOUNDS["vllm_importance_sampling_clip_max"]
    if mode.endswith("truncate"):
        return np.clip(ratio, low, high)
    return np.where((ratio < low) | (ratio > high), 0.0, ratio)


@pytest.mark.parametrize("mode", MODES)
def test_stock_grpo_trainer_trains_with_the_stand_in_in_every_mode(model_dir: Path, tmp_path: Path, mode: str):
    """Two optimizer steps (two generations) of stock GRPOTrainer: TRL's ratio and its sampling/* metrics are the
    ones the known error implies, and the sampler's log-probs are the policy's plus that error."""
    with h.stand_in_vllm(amplitude=0.3, unscored_position=UNSCORED) as sampler:
        trainer = h.run(GRPOTrainer, model_dir, vllm_args(tmp_path, 1, 1, mode, max_steps=2))
    assert len(trainer.generations) == 2
    rows = [row for row in trainer.state.log_history if "sampling/importance_sampling_ratio/mean" in row]
    assert len(rows) == 2
    for (_, batch), row in zip(trainer.generations, rows):
        ids, mask = batch["completion_ids"], batch["completion_mask"]
        want = expected_ratio(ids, mask, mode, sampler.amplitude)
        got = batch["importance_sampling_ratio"].double().numpy()
        assert got.shape == want.shape
        if mode.startswith("token"):  # TRL's ratio on padding is exp(0) = 1, never used
            got, want = got * mask.numpy(), want * mask.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # the sampler's log-probs are the trainer's own (old_per_token_logps, TRL's head) plus the known error
        real = mask.bool().clone()
        real[:, UNSCORED] = False
        error = sampler.sampling_error(ids).float()
        sampling, old = batch["sampling_per_token_logps"], batch["old_per_token_logps"]
        assert torch.allclose(sampling[real] - old[real], error[real], atol=1e-5)
        assert bool(torch.isnan(sampling[:, UNSCORED][mask[:, UNSCORED].bool()]).all())
        # TRL's metrics: over real tokens (token modes) or completions (sequence modes)
        flat = want[mask.numpy().astype(bool)] if mode.startswith("token") else want.ravel()
        assert row["sampling/importance_sampling_ratio/mean"] == pytest.approx(flat.mean(), rel=1e-5)
        assert row["sampling/importance_sampling_ratio/min"] == pytest.approx(flat.min(), rel=1e-5, abs=1e-7)
        assert row["sampling/importance_sampling_ratio/max"] == pytest.approx(flat.max(), rel=1e-5)
        scored = np.abs(error[real].double().numpy())
        assert row["sampling/sampling_logp_difference/mean"] == pytest.approx(scored.mean(), rel=1e-4)
        assert row["sampling/sampling_logp_difference/max"] == pytest.approx(scored.max(), rel=1e-4)
    # every mode acts: some ratios were cut (to a bound, or to 0) on these completions
    cut = [expected_ratio(b["completion_ids"], b["completion_mask"], mode, 0.3) for _, b in trainer.generations]
    low, high = BOUNDS["vllm_importance_sampling_clip_min"], BOUNDS["vllm_importance_sampling_clip_max"]
    hits = sum(int(np.isin(c, [0.0, low, high]).sum()) for c in cut)
    assert hits > 0
    assert all(math.isfinite(float(loss)) for loss in trainer.losses)


# --------------------------------------------------------------------------- DrGRPOTrainer on the vLLM path


def test_drgrpo_trains_on_vllm_generations_whole_step_exact(model_dir: Path, tmp_path: Path):
    """use_vllm=True without the correction: the stand-in's completions, K = 4 with spg = 2 (the window generates
    two batches ahead through the sampler), and the step's gradient is the whole batch's (no TRL code)."""
    args = h.grpo_args(tmp_path, 4, 2, use_vllm=True, vllm_importance_sampling_correction=False)
    with h.stand_in_vllm() as sampler:
        trainer = h.run(DrGRPOTrainer, model_dir, args, loss_config="dr_grpo")
    assert len(trainer.generations) == 2 and trainer.vllm_generation.calls == 2
    assert isinstance(trainer.vllm_generation, sampler)
    config = trainer.loss_config
    rollout = h.step_rollout(trainer.generations, trainer.micro[:4], config, build_tokenizer())
    loss, grads, _ = h.whole_batch_gradient(model_dir, rollout, config)
    assert h.relative_difference(trainer.step_grads[0], grads) <= 1e-5
    assert abs(float(sum(trainer.losses[:4])) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))


def _same_rollout_and_gradient(ours, stock, k: int) -> None:
    assert len(ours.generations) == len(stock.generations)
    for (_, a), (_, b) in zip(ours.generations, stock.generations):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert torch.allclose(a["advantages"], b["advantages"], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours.losses[:k], stock.losses[:k]):
        assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(b)))
    assert h.relative_difference(ours.first_step_grads, stock.first_step_grads) <= 1e-5


def _whole_step(trainer, model_dir: Path, k: int) -> None:
    config = trainer.loss_config
    rollout = h.step_rollout(trainer.generations, trainer.micro[:k], config, build_tokenizer())
    assert rollout.sampling_logp is not None
    loss, grads, _ = h.whole_batch_gradient(model_dir, rollout, config)
    assert h.relative_difference(trainer.step_grads[0], grads) <= 1e-5
    assert abs(float(sum(trainer.losses[:k])) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))
    _, uncorrected, _ = h.whole_batch_gradient(model_dir, rollout, config.replace(sampling_correction=None))
    assert h.relative_difference(uncorrected, grads) > 1e-3  # the correction acts on this step


SAMPLING_METRICS = [f"sampling/importance_sampling_ratio/{s}" for s in ("min", "mean", "max")] + [
    f"sampling/sampling_logp_difference/{s}" for s in ("mean", "max")
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_drgrpo_without_loss_config_is_stock_trl_with_the_correction(model_dir: Path, tmp_path: Path, mode: str):
    """TRL's default loss (dapo) with vLLM's correction in each mode: K = 1 against stock GRPOTrainer (rollout,
    losses, gradient, the sampling/* metrics), K = 4 with spg = 2 against the whole batch's gradient."""
    with h.stand_in_vllm(amplitude=0.3, unscored_position=UNSCORED):
        stock = h.run(GRPOTrainer, model_dir, vllm_args(tmp_path / "s", 1, 1, mode))
        ours = h.run(DrGRPOTrainer, model_dir, vllm_args(tmp_path / "o", 1, 1, mode))
        split = h.run(DrGRPOTrainer, model_dir, vllm_args(tmp_path / "k4", 4, 2, mode))
    assert ours.loss_config.sampling_correction == mode and ours.loss_config.name == "trl.dapo"
    assert (ours.loss_config.sampling_clip_min, ours.loss_config.sampling_clip_max) == (0.8, 1.25)
    _same_rollout_and_gradient(ours, stock, 1)
    rows = [[r for r in t.state.log_history if SAMPLING_METRICS[0] in r] for t in (stock, ours)]
    for key in SAMPLING_METRICS:
        assert rows[1][0][key] == pytest.approx(rows[0][0][key], rel=1e-6, abs=1e-7)
    _whole_step(split, model_dir, 4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_correction_applies_to_a_core_preset_whole_step_exact(model_dir: Path, tmp_path: Path, mode: str):
    """loss_config="dr_grpo" on a vLLM run: the run's correction (mode and bounds from GRPOConfig) weights drgrpo's
    loss; K = 4 with spg = 2 gives the whole batch's gradient."""
    with h.stand_in_vllm(amplitude=0.3, unscored_position=UNSCORED):
        trainer = h.run(DrGRPOTrainer, model_dir, vllm_args(tmp_path, 4, 2, mode), loss_config="dr_grpo")
    assert trainer.loss_config.sampling_correction == mode
    _whole_step(trainer, model_dir, 4)


@pytest.mark.slow
def test_the_off_policy_mask_on_vllm_generations(model_dir: Path, tmp_path: Path):
    """off_policy_mask_threshold: drop a negative-advantage completion whose mean (sampling - policy) log-prob is
    above it (the sampler's log-probs: vLLM's): stock's gradient at K = 1, the whole batch's with dr_grpo."""
    fields = dict(off_policy_mask_threshold=-0.01, loss_type="grpo")
    with h.stand_in_vllm(amplitude=0.3, unscored_position=UNSCORED):
        stock = h.run(GRPOTrainer, model_dir, vllm_args(tmp_path / "s", 1, 1, "token_truncate", **fields))
        ours = h.run(DrGRPOTrainer, model_dir, vllm_args(tmp_path / "o", 1, 1, "token_truncate", **fields))
        core = h.run(
            DrGRPOTrainer,
            model_dir,
            vllm_args(tmp_path / "c", 4, 2, "token_truncate", off_policy_mask_threshold=-0.01),
            loss_config="dr_grpo",
        )
    assert ours.loss_config.off_policy_mask_threshold == -0.01 == core.loss_config.off_policy_mask_threshold
    _same_rollout_and_gradient(ours, stock, 1)
    _whole_step(core, model_dir, 4)
    rollout = h.step_rollout(core.generations, core.micro[:4], core.loss_config, build_tokenizer())
    _, unmasked, _ = h.whole_batch_gradient(
        model_dir, rollout, core.loss_config.replace(off_policy_mask_threshold=None)
    )
    assert h.relative_difference(unmasked, core.step_grads[0]) > 1e-3  # the mask dropped completions


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss_type", "mode"), [("vespo", "token_truncate"), ("vespo", "token_mask"), ("luspo", "sequence_mask")]
)
def test_vespo_and_luspo_with_the_correction_are_stock_trl(model_dir: Path, tmp_path: Path, loss_type: str, mode: str):
    """VESPO folds the correction into its completion weight (TRL multiplies nothing); LUSPO multiplies it like the
    others: stock GRPOTrainer's rollout, losses and gradient at K = 2, spg = 2."""
    with h.stand_in_vllm(amplitude=0.3, unscored_position=UNSCORED):
        stock = h.run(GRPOTrainer, model_dir, vllm_args(tmp_path / "s", 2, 2, mode, loss_type=loss_type))
        ours = h.run(DrGRPOTrainer, model_dir, vllm_args(tmp_path / "o", 2, 2, mode, loss_type=loss_type))
    assert ours.loss_config.sampling_correction == mode
    _same_rollout_and_gradient(ours, stock, 2)


def test_vespo_refuses_a_sequence_level_correction(model_dir: Path, tmp_path: Path):
    """As TRL: VESPO folds the correction token by token, so the sequence modes are refused at construction."""
    with h.stand_in_vllm(), pytest.raises(ValueError, match="sequence_mask"):
        DrGRPOTrainer(str(model_dir), h.digit_reward, vllm_args(tmp_path, 1, 1, "sequence_mask", loss_type="vespo"))
