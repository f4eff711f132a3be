"""``DrGRPOTrainer.train()`` run for real (TRL 1.16, CPU, float32, the tiny Llama) against independent oracles.

The gradient of an optimizer step, read just before the optimizer steps, must equal the gradient of
drgrpo's loss over the whole step computed in one batch with no TRL code (``trl_harness.whole_batch_gradient``),
whatever the gradient accumulation K and ``steps_per_generation`` (spg); ``trl.*`` presets must give stock
``GRPOTrainer``'s numbers on the same rollout; the fused loss the logits path's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer

import drgrpo
import trl_harness as h
from drgrpo import LossConfig
from drgrpo.integrations.trl import DrGRPOTrainer
from drgrpo.train.loop.tiny import build_tokenizer
from helpers.fresh_interpreter import import_report

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss_type", "k", "spg"),
    [(t, 2, 2) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")]
    + [(t, k, spg) for t in ("grpo", "bnpo", "dr_grpo", "luspo") for k, spg in ((2, 4), (4, 2))],
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


@pytest.mark.slow
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
    assert kl[1] == pytest.approx(stock_kl[1], rel=1e-4) and kl[1] > 1e-3  # k3 * ratio, as TRL logs it


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields", [{"loss_type": "vespo"}, {"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon": 0.01}]
)
def test_vespo_and_luspo_without_loss_config_are_stock_trl_off_policy(model_dir: Path, tmp_path: Path, fields):
    """Two steps on one rollout (num_iterations = 2): the first against stock GRPOTrainer, the second (ratios away
    from 1: VESPO's Gamma weights and LUSPO's clip act) against the whole-batch oracle at each run's weights."""
    common = dict(num_iterations=2, max_steps=2, learning_rate=3e-3, **fields)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, **common))
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2, **common))
    assert ours.loss_config.name == f"trl.{fields['loss_type']}" and ours.args.loss_type == fields["loss_type"]
    assert h.relative_difference(ours.step_grads[0], stock.step_grads[0]) <= TOL
    for trainer in (stock, ours):
        trainer.loss_config = ours.loss_config
        check_step(trainer, model_dir, 2, 1, off_policy=True)
    rollout = h.step_rollout(ours.generations, ours.micro[2:4], ours.loss_config, build_tokenizer())
    _, on_policy, _ = h.whole_batch_gradient(model_dir, rollout, ours.loss_config, weights=ours.step_params[1])
    assert h.relative_difference(ours.step_grads[1], on_policy) > 1e-4  # the second step is off-policy


# --------------------------------------------------------------------------- advantage estimators


@pytest.mark.parametrize("estimator", ["rloo", "opo"])
def test_advantage_estimators_feed_the_loss_the_float64_oracles_advantages(
    model_dir: Path, tmp_path: Path, estimator: str
):
    """advantage="rloo" / "opo": the advantages of TRL's generation batch, and of the micro-batch the loss gets,
    are reference.oracle_outcome_advantages (float64, plain loops) of the same rewards and completion lengths."""
    from drgrpo import reference

    trainer = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path, 1, 1), loss_config="dr_grpo", advantage=estimator)
    assert trainer.advantage == estimator
    (_, out), micro = trainer.generations[0], trainer.micro[0]
    tokenizer = build_tokenizer()
    rows = zip(out["completion_ids"], out["completion_mask"])
    texts = [tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True) for ids, m in rows]
    lengths = out["completion_mask"].sum(1)
    assert int(lengths.min()) < int(lengths.max())  # ragged: opo's length weights matter
    want = reference.oracle_outcome_advantages(h.digit_reward(texts), h.G, estimator, lengths=lengths.tolist())
    assert torch.allclose(out["advantages"].double(), torch.as_tensor(want), rtol=1e-6, atol=1e-6)
    grpo = reference.config_advantages(h.digit_reward(texts), h.G, trainer.loss_config)
    assert float(torch.as_tensor(want - grpo).abs().max()) > 1e-2  # not the default estimator's
    fed = {(tuple(p.tolist()), tuple(c.tolist())): float(a) for p, c, a in zip(*_rows(micro))}
    made = {(tuple(p.tolist()), tuple(c.tolist())): float(a) for p, c, a in zip(*_rows(out))}
    assert fed == made  # the loss's micro-batch carries them


def _rows(batch: dict) -> tuple:
    return batch["prompt_ids"], batch["completion_ids"] * batch["completion_mask"], batch["advantages"]


def test_an_unknown_advantage_estimator_is_one_clear_error(model_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"^advantage must be one of grpo, rloo, .*, gpg; got 'rlooo' \(e.g. advan"):
        DrGRPOTrainer(str(model_dir), h.digit_reward, _args(tmp_path), h.train_dataset(8), advantage="rlooo")


# --------------------------------------------------------------------------- fused


@pytest.mark.slow
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


@pytest.mark.slow
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


LOSS_METRICS = (*TRL_METRICS, "cispo_clip_ratio", "kl", "vespo/phi_seq_mean")  # what TRL's loss logs (and policy_loss)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        {"loss_type": "grpo", "epsilon": 0.01},
        {"loss_type": "bnpo", "epsilon": 0.01},
        {"loss_type": "dr_grpo", "epsilon": 0.01},
        {"loss_type": "dapo", "epsilon": 0.01, "beta": 0.04},  # kl: TRL's k3 weighted by the ratio
        {"loss_type": "dapo", "epsilon": 0.01, "beta": 0.04, "use_bias_correction_kl": False},
        {"loss_type": "grpo", "epsilon": 0.01, "importance_sampling_level": "sequence"},  # GSPO: shares of completions
        {"loss_type": "cispo"},  # TRL's cap is epsilon_high = epsilon = 0.2: every token with A > 0 is capped
        {"loss_type": "cispo", "epsilon_high": 1.0},  # the second step caps some tokens
        {"loss_type": "sapo"},
        {"loss_type": "luspo", "epsilon": 0.01, "importance_sampling_level": "sequence"},
        {"loss_type": "vespo"},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_every_loss_type_logs_trls_metrics_with_trls_values(model_dir: Path, tmp_path: Path, fields: dict):
    """For each TRL loss type, DrGRPOTrainer with no loss_config logs the loss metrics stock GRPOTrainer logs, with
    stock's values, on both steps of a two-step run (the second one off-policy) from the same seed."""
    common = dict(num_iterations=2, max_steps=2, learning_rate=3e-3, **fields)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, **common))
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2, **common))
    rows = [[row for row in t.state.log_history if "entropy" in row] for t in (stock, ours)]
    assert [len(r) for r in rows] == [2, 2]
    for step, (want, got) in enumerate(zip(*rows)):
        logged = {key for key in LOSS_METRICS if key in want}
        assert logged == {key for key in LOSS_METRICS if key in got}, step
        for key in logged:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key, want[key], got[key])
    if fields["loss_type"] == "cispo":
        assert "drgrpo/clip_frac_high" not in rows[1][1]
        if "epsilon_high" not in fields:
            assert rows[0][0]["cispo_clip_ratio"] > 0  # TRL counts only tokens with A > 0, not every capped one
        else:
            assert rows[0][0]["cispo_clip_ratio"] == 0 < rows[0][1]["cispo_clip_ratio"]
    if fields.get("importance_sampling_level") == "sequence":  # a share of the 16 completions: a multiple of 1/16
        share = rows[0][1]["clip_ratio/region_mean"]
        assert share > 0 and share * 16 == pytest.approx(round(share * 16))
    if "beta" in fields:
        assert rows[0][1]["kl"] > 1e-4
    if fields["loss_type"] == "vespo":  # phi(1) = 1 on the first step; the second step's ratios move it
        assert rows[0][0]["vespo/phi_seq_mean"] == pytest.approx(1.0, abs=1e-6)
        assert abs(rows[0][1]["vespo/phi_seq_mean"] - 1) > 1e-4


# --------------------------------------------------------------------------- the entropy bonus


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "k", "spg"), [("grpo", 1, 1), ("dapo", 2, 2), ("dr_grpo", 4, 2)])
def test_the_entropy_bonus_without_loss_config_is_stock_trls(model_dir: Path, tmp_path: Path, loss_type, k, spg):
    """entropy_coef > 0: TRL's bonus (each micro-batch's mean entropy over K), stock's gradient and metrics."""
    fields = dict(loss_type=loss_type, entropy_coef=0.05)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", k, spg, **fields))
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", k, spg, **fields))
    for a, b in zip(stock.losses, ours.losses):
        assert abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(a)))
    assert h.relative_difference(ours.first_step_grads, stock.first_step_grads) <= TOL
    plain = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "p", k, spg, loss_type=loss_type))
    assert h.relative_difference(plain.first_step_grads, stock.first_step_grads) > 1e-3  # the bonus acts
    rows = [[r for r in t.state.log_history if "entropy_coef" in r] for t in (stock, ours)]
    assert [r[0]["entropy_coef"] for r in rows] == [0.05, 0.05]
    assert rows[1][0]["policy_loss"] == pytest.approx(rows[0][0]["policy_loss"], rel=1e-4, abs=1e-6)


def test_the_entropy_bonus_of_a_core_preset_is_the_whole_steps(model_dir: Path, tmp_path: Path):
    """loss_config="dr_grpo" with entropy_coef: minus c times the mean entropy over all the step's tokens, whatever
    the split (K = 4, spg = 2 against one batch, no TRL code)."""
    trainer = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path, 4, 2, entropy_coef=0.05), loss_config="dr_grpo")
    config = trainer.loss_config
    rollout = h.step_rollout(trainer.generations, trainer.micro[:4], config, build_tokenizer())
    assert config.entropy_coef == 0.05  # the run's bonus, in the loss config
    loss, grads, _ = h.whole_batch_gradient(model_dir, rollout, config)
    assert h.relative_difference(trainer.step_grads[0], grads) <= TOL
    assert abs(float(sum(trainer.losses[:4])) - float(loss)) <= TOL * max(1.0, abs(float(loss)))
    _, plain, _ = h.whole_batch_gradient(model_dir, rollout, config.replace(entropy_coef=0.0))
    assert h.relative_difference(plain, grads) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("bonus", [0.0, 0.05])
def test_the_high_entropy_mask_without_loss_config_is_stock_trls(model_dir: Path, tmp_path: Path, bonus: float):
    """top_entropy_quantile = 0.5 (TRL's threshold per micro-batch), with and without the bonus on the kept tokens:
    stock GRPOTrainer's losses and gradient at K = 2, spg = 2."""
    fields = dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=bonus)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, **fields))
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2, **fields))
    assert ours.loss_config.top_entropy_quantile == 0.5
    for a, b in zip(stock.losses, ours.losses):
        assert abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(a)))
    assert h.relative_difference(ours.first_step_grads, stock.first_step_grads) <= TOL
    plain = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "p", 2, 2, loss_type="grpo", entropy_coef=bonus))
    assert h.relative_difference(plain.first_step_grads, stock.first_step_grads) > 1e-3  # the mask acts


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_the_high_entropy_mask_of_a_core_preset_is_the_whole_steps(model_dir: Path, tmp_path: Path, fused: bool):
    """loss_config="dr_grpo" with top_entropy_quantile = 0.5: one threshold over the whole step's tokens (all
    processes), so K = 4 with spg = 2 gives the whole batch's gradient; with the bonus (in the fused pass too)."""
    args = h.grpo_args(tmp_path, 4, 2, top_entropy_quantile=0.5, entropy_coef=0.05)
    trainer = h.run(DrGRPOTrainer, model_dir, args, loss_config="dr_grpo", fused=fused)
    config = trainer.loss_config
    assert config.top_entropy_quantile == 0.5
    rollout = h.step_rollout(trainer.generations, trainer.micro[:4], config, build_tokenizer())
    loss, grads, _ = h.whole_batch_gradient(model_dir, rollout, config)
    assert h.relative_difference(trainer.step_grads[0], grads) <= TOL
    assert abs(float(sum(trainer.losses[:4])) - float(loss)) <= TOL * max(1.0, abs(float(loss)))
    _, unmasked, _ = h.whole_batch_gradient(model_dir, rollout, config.replace(top_entropy_quantile=1.0))
    assert h.relative_difference(unmasked, grads) > 1e-3


def test_the_fused_entropy_bonus_is_stock_trls(model_dir: Path, tmp_path: Path):
    """fused=True with TRL's bonus and mask (grpo: per micro-batch): stock GRPOTrainer's gradient at K = 2, spg = 2."""
    fields = dict(loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.5)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, **fields))
    fused = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "f", 2, 2, **fields), fused=True)
    for a, b in zip(stock.losses, fused.losses):
        assert abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(a)))
    assert h.relative_difference(fused.first_step_grads, stock.first_step_grads) <= TOL
    rows = [[r for r in t.state.log_history if "policy_loss" in r] for t in (stock, fused)]
    assert rows[1][0]["policy_loss"] == pytest.approx(rows[0][0]["policy_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_the_adaptive_entropy_controller_is_trls(model_dir: Path, tmp_path: Path):
    """use_adaptive_entropy: no bonus on the first step (no measurement yet), then the bonus while the previous
    step's entropy (about 2.85 nats here) is at most entropy_target; the coefficient moves by entropy_coef_delta
    after each step within its bounds. Three steps: the same coefficients, losses and first gradient as stock."""
    fields = dict(
        use_adaptive_entropy=True,
        entropy_coef=0.01,
        entropy_coef_delta=0.02,
        entropy_coef_max=0.04,
        entropy_target=5.0,
        max_steps=3,
        loss_type="grpo",
    )
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, **fields))
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2, **fields))
    coefs = [[r["entropy_coef"] for r in t.state.log_history if "entropy_coef" in r] for t in (stock, ours)]
    assert coefs[0] == pytest.approx([0.03, 0.04, 0.04]) and coefs[1] == pytest.approx(coefs[0])
    assert ours._last_world_entropy == pytest.approx(stock._last_world_entropy, rel=1e-4)
    assert ours._entropy_controller.last_entropy == ours._last_world_entropy  # one controller: drgrpo's
    # TRL's checkpoint file of the controller, written and read back by TRL's own methods
    ours._save_checkpoint(ours.model, trial=None)
    checkpoint = Path(ours.args.output_dir) / f"checkpoint-{ours.state.global_step}"
    saved = json.loads((checkpoint / "entropy_ctrl_state.json").read_text())
    assert saved["entropy_coef"] == pytest.approx(0.04)
    assert saved["last_world_entropy"] == pytest.approx(stock._last_world_entropy, rel=1e-4)
    ours._entropy_controller.coef, ours._entropy_controller.last_entropy = 0.0, float("inf")
    ours._load_optimizer_and_scheduler(str(checkpoint))
    assert ours._applied_entropy_coef() == pytest.approx(0.04)  # restored: the next step's bonus
    assert h.relative_difference(ours.first_step_grads, stock.first_step_grads) <= TOL
    rows = [[r for r in t.state.log_history if "policy_loss" in r] for t in (stock, ours)]
    for a, b in zip(*rows):  # the logged loss includes the bonus from the second step on
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-6)
    bonus = [r["loss"] - r["policy_loss"] for r in rows[1]]
    assert bonus[0] == pytest.approx(0.0, abs=1e-6) and bonus[1] < -1e-3  # minus c H once the target is met
    low = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "l", 2, 2, **{**fields, "entropy_target": 0.1}))
    low_coefs = [r["entropy_coef"] for r in low.state.log_history if "entropy_coef" in r]
    assert low_coefs == pytest.approx([0.0, 0.0, 0.0])  # entropy above the target: the coefficient goes down


def test_fused_refuses_trls_per_micro_batch_bonus_where_the_loss_is_per_step(model_dir: Path, tmp_path: Path):
    """trl.dapo (TRL's default loss) is normalised per step; the fused pass's bonus would be too, TRL's is not."""
    with pytest.raises(ValueError, match=r"fused=True adds the entropy bonus with the step's token count.*fused=False"):
        DrGRPOTrainer(
            str(model_dir), h.digit_reward, _args(tmp_path, entropy_coef=0.01), h.train_dataset(8), fused=True
        )


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


@pytest.mark.slow
def test_import_without_trl_names_the_extra():
    # a fresh interpreter where every trl import fails (tests/helpers/fresh_interpreter.py)
    report = import_report()
    assert report["without_trl"] is not None
    assert report["without_trl"].startswith("drgrpo.integrations.trl needs TRL")
    assert "from a clone of drgrpo, pip install -e '.[trl]'" in report["without_trl"]
    assert report["core_version"] == drgrpo.__version__  # the core does not need TRL


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_training_on_the_addition_task_raises_held_out_accuracy(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from datasets import Dataset

    from drgrpo.train import TaskConfig, exact_match, make_splits
    from drgrpo.train.loop.warmstart import probe_accuracy
    from helpers.shared_dirs import default_warm_start

    task = TaskConfig()
    start = default_warm_start(tmp_path_factory)  # ~25% greedy accuracy (the docs' TRL examples start from it too)
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
