"""``DrGRPOTrainer``'s settings: no silent override of a ``GRPOConfig`` field, TRL's meaning of a ``None`` reward.

The checks against stock TRL run both trainers for real (TRL 1.16, CPU, float32, the tiny Llama) on the same
rollout: ``trainer.args`` describes the run when stock ``GRPOTrainer`` given those args computes the same
advantages, losses and gradient.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer

import trl_harness as h
from drgrpo import LossConfig, group_advantages, preset_names
from drgrpo.integrations.trl import DRGRPO_LOSS_TYPE, DrGRPOTrainer, resolve_loss_config
from drgrpo.integrations.trl_cli import loss_config_from
from drgrpo.integrations.trl_settings import command_line_hints, settings_warning

TOL = 1e-5  # relative, float32
LOGGER = "drgrpo.integrations.trl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _args(tmp_path: Path, **overrides) -> GRPOConfig:
    return h.grpo_args(tmp_path, 1, 1, **overrides)


def assert_same_run(ours, stock, k: int) -> None:
    """The same rollout and advantages; the same losses and gradient on the first optimizer step (K = k)."""
    assert len(ours.generations) == len(stock.generations)
    for (_, a), (_, b) in zip(ours.generations, stock.generations):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert torch.allclose(a["advantages"], b["advantages"], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours.losses[:k], stock.losses[:k]):
        assert abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(b)))
    assert h.relative_difference(ours.first_step_grads, stock.first_step_grads) <= TOL


# --------------------------------------------------------------------------- no loss_config: TRL's own loss


@pytest.mark.slow
def test_without_loss_config_the_loss_is_the_one_grpo_config_describes(model_dir: Path, tmp_path: Path, caplog):
    """GRPOConfig(loss_type=...) with no loss_config trains that loss, with every TRL field as TRL reads it."""
    fields = dict(loss_type="grpo", scale_rewards="batch", epsilon=0.1, epsilon_high=0.3, beta=0.04)
    args = h.grpo_args(tmp_path / "a", 2, 2, num_iterations=2, max_steps=2, learning_rate=3e-3, **fields)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ours = h.run(DrGRPOTrainer, model_dir, args)
    assert not [r for r in caplog.records if r.name == LOGGER]  # nothing was changed, nothing to warn about
    config = ours.loss_config
    assert (config.name, config.advantage_std, config.clip_low, config.clip_high, config.beta) == (
        "trl.grpo",
        "batch",
        0.1,
        0.3,
        0.04,
    )
    assert config.kl_importance_weight and ours.ref_model is not None
    assert {name: getattr(ours.args, name) for name in fields} == fields  # args unchanged
    stock_args = h.grpo_args(tmp_path / "b", 2, 2, num_iterations=2, max_steps=2, learning_rate=3e-3, **fields)
    assert_same_run(ours, h.run(GRPOTrainer, model_dir, stock_args), 2)


def test_default_grpo_config_trains_trls_default_loss(tmp_path: Path):
    config, changes = resolve_loss_config(None, _args(tmp_path))
    assert config.name == "trl.dapo" and changes == {}
    assert (config.clip_low, config.clip_high, config.advantage_std, config.std_eps) == (0.2, 0.2, "group", 1e-4)
    config, _ = resolve_loss_config(None, _args(tmp_path, loss_type="dr_grpo"))
    assert config.name == "trl.dr_grpo" and config.max_completion_length == h.MAX_NEW
    config, _ = resolve_loss_config(None, _args(tmp_path, loss_type="cispo", epsilon_high=5.0))
    assert config.cispo_cap == 5.0
    config, _ = resolve_loss_config(None, _args(tmp_path, loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=4.0))
    assert (config.name, config.surrogate, config.vespo_k_pos, config.vespo_lambda_neg) == (
        "trl.vespo",
        "vespo",
        1.5,
        4.0,
    )
    config, _ = resolve_loss_config(None, _args(tmp_path, loss_type="luspo", importance_sampling_level="sequence"))
    assert (config.name, config.ratio_level, config.per_call_normalization) == ("trl.luspo", "sequence", True)
    future = _args(tmp_path)
    future.loss_type = "future"  # a loss type of a later TRL
    with pytest.raises(
        ValueError, match=r"loss_type='future' has no drgrpo equivalent.*'vespo'.*loss_config='dr_grpo'"
    ):
        resolve_loss_config(None, future)


# --------------------------------------------------------------------------- a loss_config: warnings


def test_defaults_set_from_the_loss_config_are_warned_with_old_and_new_values(model_dir: Path, tmp_path: Path, caplog):
    args = _args(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = DrGRPOTrainer(str(model_dir), h.digit_reward, args, h.train_dataset(8), loss_config="dr_grpo")
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.WARNING
    assert "loss_type 'dapo' -> 'dr_grpo'" in record.message
    assert "scale_rewards 'group' -> 'none'" in record.message
    assert (trainer.args.loss_type, trainer.args.scale_rewards) == ("dr_grpo", "none")
    assert (args.loss_type, args.scale_rewards) == ("dapo", "group")  # the caller's GRPOConfig is not modified


def test_an_explicit_beta_of_zero_is_overridden_only_with_a_warning(model_dir: Path, tmp_path: Path, caplog):
    """GRPOConfig cannot tell beta=0.0 from the default: the preset's 0.04 wins, and the warning says how to keep 0."""
    args = _args(tmp_path, beta=0.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = DrGRPOTrainer(str(model_dir), h.digit_reward, args, h.train_dataset(8), loss_config="grpo")
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert "beta 0.0 -> 0.04 (TRL now builds a reference model" in record.message
    assert "LossConfig.preset('grpo', beta=0.0)" in record.message
    assert "use_bias_correction_kl True -> False" in record.message and "loss_type 'dapo' -> 'grpo'" in record.message
    assert trainer.args.beta == 0.04 and trainer.ref_model is not None and args.beta == 0.0
    kept = DrGRPOTrainer(
        str(model_dir), h.digit_reward, args, h.train_dataset(8), loss_config=LossConfig.preset("grpo", beta=0.0)
    )
    assert kept.args.beta == 0.0 and kept.ref_model is None


@pytest.mark.slow
def test_the_warning_shows_in_a_plain_script(model_dir: Path, tmp_path: Path):
    """No logging set-up at all (TRL's and transformers' defaults): the WARNING reaches stderr."""
    script = textwrap.dedent(
        f"""
        import os
        os.environ["HF_HUB_OFFLINE"] = "1"
        from datasets import Dataset
        from trl import GRPOConfig
        from drgrpo.integrations.trl import DrGRPOTrainer

        def reward(completions, **kwargs):
            return [float(len(c)) for c in completions]

        args = GRPOConfig(output_dir={str(tmp_path / "out")!r}, use_cpu=True, bf16=False, report_to=[],
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=8)
        data = Dataset.from_list([{{"prompt": "1 2 + 3 4 ="}}] * 4)
        trainer = DrGRPOTrainer({str(model_dir)!r}, reward, args, data, loss_config="dr_grpo")
        print("LOSS_TYPE", trainer.args.loss_type)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOSS_TYPE dr_grpo" in out.stdout
    assert "scale_rewards 'group' -> 'none'" in out.stderr


# --------------------------------------------------------------------------- trainer.args describes the run


@pytest.mark.parametrize(
    ("preset", "overrides", "loss_type"),
    [
        ("dr_grpo", {}, "dr_grpo"),
        ("dapo", {"std_eps": 1e-4}, "dapo"),  # TRL's std epsilon is 1e-4 (no GRPOConfig field)
        ("grpo", {"std_eps": 1e-4}, "grpo"),  # beta 0.04: a reference model, k3 KL not weighted by the ratio
        ("gspo", {"std_eps": 1e-4}, "grpo"),  # TRL's GSPO: loss_type grpo, importance_sampling_level sequence
        ("cispo", {"std_eps": 1e-4}, "cispo"),  # TRL caps at epsilon_high itself: 5.0
    ],
)
def test_stock_trl_given_trainer_args_runs_the_same_loss(
    model_dir: Path, tmp_path: Path, preset: str, overrides: dict, loss_type: str
):
    config = LossConfig.preset(preset, max_completion_length=h.MAX_NEW, **overrides)
    if preset != "dr_grpo":
        config = LossConfig.preset(preset, **overrides)
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "ours", 2, 2), loss_config=config)
    assert ours.args.loss_type == loss_type
    stock_args = copy.copy(ours.args)  # exactly what the trainer ran with
    stock_args.output_dir = str(tmp_path / "stock")
    assert_same_run(ours, h.run(GRPOTrainer, model_dir, stock_args), 2)


@pytest.mark.parametrize(
    ("preset", "loss_type"),
    [
        ("trl.sapo", "sapo"),
        ("trl.bnpo", "bnpo"),
        ("bnpo", "dapo"),  # drgrpo's bnpo is the step's token mean: TRL's "dapo" aggregation
        ("sapo", DRGRPO_LOSS_TYPE),  # SAPO with a token mean: no TRL loss type
        ("seed", DRGRPO_LOSS_TYPE),  # k1 KL
        ("verl.vanilla", DRGRPO_LOSS_TYPE),  # dual clip
        ("verl.cispo", DRGRPO_LOSS_TYPE),  # two-sided CISPO clip
    ],
)
def test_loss_type_names_the_trl_loss_or_the_drgrpo_marker(tmp_path: Path, preset: str, loss_type: str):
    _, changes = resolve_loss_config(preset, _args(tmp_path))
    assert changes.get("loss_type", "dapo") == loss_type


@pytest.mark.parametrize(
    ("overrides", "loss_config", "match"),
    [
        ({"loss_type": "grpo"}, "dr_grpo", r"loss_type='grpo' contradicts .*'trl\.grpo'"),
        (
            {"scale_rewards": "batch"},
            "dr_grpo",
            r"scale_rewards='batch' contradicts .*=LossConfig\.preset\('dr_grpo', max_completion_length=8, "
            r"advantage_std='batch'\)",
        ),
        ({"epsilon_high": 0.28}, "dr_grpo", r"epsilon_high=0\.28 contradicts .*clip_high=0\.28\)"),
        ({"epsilon": 0.1}, "dapo", r"epsilon=0\.1 contradicts .*LossConfig\.preset\('dapo', clip_low=0\.1\)"),
        ({"beta": 0.1}, "grpo", r"beta=0\.1 contradicts .*LossConfig\.preset\('grpo', beta=0\.1\)"),
        ({"delta": 2.0}, "dapo", r"delta=2\.0 contradicts .*delta=2\.0\)"),
        ({"importance_sampling_level": "sequence"}, "dapo", r"contradicts .*ratio_level='sequence'\)"),
        ({"loss_type": "bnpo"}, "trl.dapo", "loss_type='bnpo' contradicts"),
        ({"epsilon_high": 5.0}, "trl.cispo", r"epsilon_high=5\.0 contradicts .*cispo_cap=5\.0\)"),
        ({"sapo_temperature_pos": 2.0}, "sapo", r"contradicts .*sapo_tau_pos=2\.0\)"),
    ],
)
def test_contradicting_trl_settings_raise_naming_the_field(tmp_path: Path, overrides: dict, loss_config, match):
    with pytest.raises(ValueError, match=match):
        resolve_loss_config(loss_config, _args(tmp_path, **overrides))


HINT_CASES = [
    ({"scale_rewards": "batch"}, "dr_grpo"),
    ({"epsilon": 0.1}, LossConfig.preset("dapo", clip_high=0.3)),  # the user's own clip_high is kept in the hint
    ({"epsilon_high": 5.0}, "trl.cispo"),
    ({"sapo_temperature_pos": 2.0}, "sapo"),
    ({"beta": 0.1}, "grpo"),
]


@pytest.mark.parametrize(("overrides", "loss_config"), HINT_CASES)
def test_the_python_hint_is_a_loss_config_that_agrees(tmp_path: Path, overrides: dict, loss_config):
    """The hint, run as Python, gives a loss config the same arguments accept (nothing left to contradict)."""
    args = _args(tmp_path, **overrides)
    with pytest.raises(ValueError, match="contradicts") as error:
        resolve_loss_config(loss_config, args)
    hint = str(error.value).rsplit("put the value into the loss config: ", 1)[1]
    assert hint.startswith("loss_config=LossConfig.preset(") and "--" not in hint
    fixed = eval(hint.removeprefix("loss_config="), {"LossConfig": LossConfig})
    config, _ = resolve_loss_config(fixed, args)
    if isinstance(loss_config, LossConfig):
        assert config.clip_high == loss_config.clip_high


@pytest.mark.parametrize(("overrides", "loss_config"), HINT_CASES)
def test_the_command_line_hint_is_a_loss_config_flag_that_agrees(tmp_path: Path, overrides: dict, loss_config):
    """From drgrpo trl the hint is --loss_config '{"preset": ...}', which the command line parses into a loss config
    the same arguments accept."""
    args = _args(tmp_path, **overrides)
    with command_line_hints(), pytest.raises(ValueError, match="contradicts") as error:
        resolve_loss_config(loss_config, args)
    hint = str(error.value).rsplit("put the value into the loss config: ", 1)[1]
    assert hint.startswith('--loss_config \'{"preset": ') and hint.endswith("}'") and "LossConfig" not in hint
    fixed = loss_config_from(hint.removeprefix("--loss_config ").strip("'"), args.max_completion_length)
    config, _ = resolve_loss_config(fixed, args)
    if isinstance(loss_config, LossConfig):
        assert config.clip_high == loss_config.clip_high
    with pytest.raises(ValueError, match="contradicts") as python_error:  # outside the block: Python again
        resolve_loss_config(loss_config, args)
    assert "LossConfig.preset(" in str(python_error.value)


def test_every_hint_takes_the_users_syntax(tmp_path: Path):
    """The other hints (loss_type, no constant L, the warning's beta, a TRL loss type with no preset)."""
    config, changes = resolve_loss_config("grpo", _args(tmp_path))
    with command_line_hints():
        warning = settings_warning(config, changes, _args(tmp_path))
        with pytest.raises(ValueError) as loss_type:
            resolve_loss_config("dr_grpo", _args(tmp_path, loss_type="grpo"))
        with pytest.raises(ValueError) as no_length:
            resolve_loss_config(
                LossConfig.preset("dapo").replace(aggregation="seq-mean-token-sum-norm"), _args(tmp_path)
            )
        future = _args(tmp_path)
        future.loss_type = "future"
        with pytest.raises(ValueError) as unknown:
            resolve_loss_config(None, future)
    assert warning is not None and """--loss_config '{"preset": "grpo", "beta": 0.0}'""" in warning
    assert "--loss_config trl.grpo" in str(loss_type.value)
    assert "--loss_config dr_grpo takes max_completion_length" in str(no_length.value)
    fix = """--loss_config '{"preset": "dapo", "aggregation": "seq-mean-token-sum-norm", "max_completion_length": 8}'"""
    assert fix in str(no_length.value)
    assert "e.g. --loss_config dr_grpo" in str(unknown.value)
    for error in (loss_type, no_length, unknown):
        assert "loss_config=" not in str(error.value) and "LossConfig.preset" not in str(error.value)


def test_a_trl_loss_type_without_a_preset_is_not_sent_to_one(tmp_path: Path):
    """A loss_type beside a loss_config: the error names the trl.* preset only when it exists."""
    future = _args(tmp_path)
    future.loss_type = "future"  # a loss type of a later TRL, which drgrpo has no preset for
    with pytest.raises(ValueError, match="loss_type='future' contradicts") as error:
        resolve_loss_config("dr_grpo", future)
    assert "trl.future" not in str(error.value)
    assert "drgrpo has no preset for TRL's 'future' loss" in str(error.value)
    with pytest.raises(ValueError, match="loss_type='vespo' contradicts") as vespo:
        resolve_loss_config("dr_grpo", _args(tmp_path, loss_type="vespo"))
    assert "TRL's 'vespo' loss is loss_config='trl.vespo'" in str(vespo.value)


def test_a_custom_configs_hint_uses_replace(tmp_path: Path):
    custom = LossConfig(aggregation="token-mean", advantage_std="none")
    with pytest.raises(ValueError, match=r"loss_config=loss_config\.replace\(clip_low=0\.3\)"):
        resolve_loss_config(custom, _args(tmp_path, epsilon=0.3))


def test_agreeing_trl_settings_change_nothing(tmp_path: Path):
    args = _args(tmp_path, loss_type="dr_grpo", scale_rewards="none", epsilon_high=0.2)
    assert resolve_loss_config("dr_grpo", args)[1] == {}
    assert resolve_loss_config("dapo", _args(tmp_path, epsilon_high=0.28, loss_type="dapo"))[1] == {}
    custom = LossConfig.preset("trl.cispo", cispo_cap=5.0)
    assert resolve_loss_config(custom, _args(tmp_path, loss_type="cispo", epsilon_high=5.0))[1] == {}


def test_named_presets_take_l_from_max_completion_length(tmp_path: Path):
    config, _ = resolve_loss_config("dr_grpo", _args(tmp_path))
    assert config.max_completion_length == h.MAX_NEW and config.advantage_std == "none"
    config, changes = resolve_loss_config("trl.dr_grpo", _args(tmp_path))
    assert config.max_completion_length == h.MAX_NEW and changes == {"loss_type": "dr_grpo"}
    assert resolve_loss_config("dapo", _args(tmp_path))[0].max_completion_length is None  # token-mean: no L
    explicit = LossConfig.preset("dr_grpo", max_completion_length=100)
    config, changes = resolve_loss_config(explicit, _args(tmp_path))
    assert config.max_completion_length == 100
    assert changes["loss_type"] == DRGRPO_LOSS_TYPE  # TRL's dr_grpo divides by max_completion_length (8), not 100


def test_bad_arguments_are_named(tmp_path: Path):
    args = _args(tmp_path)
    with pytest.raises(TypeError, match="loss_config must be a LossConfig, a preset name"):
        resolve_loss_config(3, args)
    with pytest.raises(ValueError, match="unknown preset 'dr-grpo'"):
        resolve_loss_config("dr-grpo", args)
    with pytest.raises(ValueError, match=r"trl\.dr_grpo divides by TRL's max_completion_length"):
        resolve_loss_config(LossConfig.preset("trl.dr_grpo", max_completion_length=100), args)
    with pytest.raises(TypeError, match="fused must be a bool"):
        DrGRPOTrainer("unused", h.digit_reward, args, fused="yes")
    with pytest.raises(TypeError, match=r"args must be a trl\.GRPOConfig"):
        DrGRPOTrainer("unused", h.digit_reward, object())


# --------------------------------------------------------------------------- a config that cannot run


@pytest.mark.parametrize(
    "config",
    [LossConfig(), LossConfig(aggregation="token-sum-norm"), LossConfig(forced_aggregation="seq-mean-token-sum-norm")],
)
def test_a_config_without_its_constant_l_fails_at_construction(tmp_path: Path, config: LossConfig):
    args = _args(tmp_path)
    with pytest.raises(
        ValueError, match=r"cannot run: .*loss_config=loss_config\.replace\(max_completion_length=8\)"
    ) as error:
        DrGRPOTrainer("never-loaded", h.digit_reward, args, loss_config=config)  # before the model is even read
    assert "aggregation" in str(error.value)
    ok = config.replace(max_completion_length=args.max_completion_length)
    assert resolve_loss_config(ok, args)[0].max_completion_length == args.max_completion_length


# --------------------------------------------------------------------------- None rewards: TRL's meaning


def _partial(completions, **kwargs):
    """Scores every completion but each 4th from the second (i % 4 == 1): TRL's "not applicable"."""
    return [None if i % 4 == 1 else h.digit_reward([c])[0] for i, c in enumerate(completions)]


def _partial_other(completions, **kwargs):
    """Scores only i % 4 == 3: with _partial, i % 4 == 1 is scored by no function, i % 4 == 3 by both."""
    return [float(len(c.split())) / 4 if i % 4 == 3 else None for i, c in enumerate(completions)]


@pytest.mark.parametrize(
    ("scale_rewards", "config"),
    [
        ("none", LossConfig.preset("dr_grpo", max_completion_length=h.MAX_NEW)),
        ("group", LossConfig.preset("dapo", std_eps=1e-4)),  # TRL's std epsilon
        ("batch", LossConfig.preset("dapo", std_eps=1e-4, advantage_std="batch")),
    ],
)
def test_none_rewards_give_stock_trls_advantages(model_dir: Path, tmp_path: Path, scale_rewards: str, config):
    rewards = [_partial, _partial_other]
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2), loss_config=config, reward_funcs=rewards)
    assert ours.loss_config.nan_rewards == "ignore"
    stock_args = h.grpo_args(tmp_path / "s", 2, 2, scale_rewards=scale_rewards, loss_type="dapo", epsilon_high=0.28)
    stock = h.run(GRPOTrainer, model_dir, stock_args, reward_funcs=rewards)
    for (_, a), (_, b) in zip(ours.generations, stock.generations):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert torch.allclose(a["advantages"], b["advantages"], rtol=1e-5, atol=1e-6)
        unscored = torch.arange(a["advantages"].numel()) % 4 == 1
        assert bool((a["advantages"][unscored] == 0).all())
        assert bool((a["advantages"][~unscored] != 0).any())


def _nan_aware_oracle(rewards: np.ndarray, group: int, config: LossConfig) -> np.ndarray:
    """float64 advantages with NaN rewards left out of mean and std and given 0 (TRL's rule), independent of drgrpo."""
    out = np.zeros_like(rewards)
    valid_all = ~np.isnan(rewards)
    ddof = 1 if config.std_unbiased else 0
    batch = rewards[valid_all]
    batch_std = batch.std(ddof=ddof) if batch.size > ddof else 0.0
    for g in range(0, rewards.size, group):
        r, valid = rewards[g : g + group], valid_all[g : g + group]
        if not valid.any():
            continue
        centered = r - r[valid].mean()
        if config.advantage_std != "none":
            group_std = r[valid].std(ddof=ddof) if valid.sum() > ddof else 0.0
            std = batch_std if config.advantage_std == "batch" else group_std
            denom = std + config.std_eps
            below = config.std_zero_threshold is not None and std < config.std_zero_threshold
            centered = np.zeros_like(r) if denom == 0 or below else centered / denom
        out[g : g + group] = np.where(valid, centered, 0.0)
    return out


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_leaves_unscored_completions_out_as_trl_does(tmp_path: Path, preset: str):
    config, _ = resolve_loss_config(preset, _args(tmp_path))
    assert config.nan_rewards == "ignore"
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=24)
    rewards[[1, 5, 6, 20, 21, 22, 23]] = np.nan  # one group with no score at all
    rewards[12:16] = 0.5  # no spread
    got = group_advantages(torch.tensor(rewards), 4, config).numpy()
    np.testing.assert_allclose(got, _nan_aware_oracle(rewards, 4, config), rtol=1e-12, atol=1e-12)
    assert got[20:24].tolist() == [0.0] * 4 and got[1] == 0.0


# --------------------------------------------------------------------------- several rewards: normalize_then_sum


@pytest.mark.slow
def test_normalize_then_sum_without_loss_config_is_stock_trl(model_dir: Path, tmp_path: Path):
    """Two reward functions (one scoring a quarter of the completions), each normalised in its group before the
    weighted sum, then over the whole batch: stock GRPOTrainer's advantages, losses and gradient."""
    fields = dict(multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5], loss_type="grpo")
    rewards = [h.digit_reward, _partial_other]
    ours = h.run(DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "o", 2, 2, **fields), reward_funcs=rewards)
    stock = h.run(GRPOTrainer, model_dir, h.grpo_args(tmp_path / "s", 2, 2, **fields), reward_funcs=rewards)
    assert_same_run(ours, stock, 2)
    sum_first = h.run(
        DrGRPOTrainer, model_dir, h.grpo_args(tmp_path / "f", 2, 2, loss_type="grpo"), reward_funcs=rewards
    )
    for (_, a), (_, b) in zip(ours.generations, sum_first.generations):  # the setting acts: other advantages
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert not torch.allclose(a["advantages"], b["advantages"], atol=1e-3)


@pytest.mark.parametrize("preset", ["dr_grpo", "grpo"])
def test_normalize_then_sum_with_a_loss_config_feeds_its_advantages(model_dir: Path, tmp_path: Path, preset: str):
    """With a loss_config, each function's rewards are normalised in their group (TRL's first stage), summed with the
    weights, and the config's own advantage rule applies to the sum (dr_grpo: centred, no std): float64 oracle."""
    args = h.grpo_args(tmp_path, 1, 1, multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5])
    rewards = [_partial, _partial_other]  # i % 4 == 1 scored by neither: advantage 0
    trainer = h.run(DrGRPOTrainer, model_dir, args, loss_config=preset, reward_funcs=rewards)
    per_func = trainer._rewards_per_func.double().numpy()  # (N, 2): TRL's rewards of the one generation batch
    stage = LossConfig(advantage_std="group", std_eps=1e-4, nan_rewards="ignore")
    columns = [_nan_aware_oracle(per_func[:, k], h.G, stage) for k in range(2)]
    total = columns[0] * 1.0 + columns[1] * 0.5
    total[np.isnan(per_func).all(axis=1)] = np.nan
    want = _nan_aware_oracle(total, h.G, trainer.loss_config)
    got = trainer.generations[0][1]["advantages"].double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).max() > 0.1 and (want[1::4] == 0).all()


# --------------------------------------------------------------------------- the run's correction and mask


def test_the_runs_vllm_correction_and_mask_reach_the_loss_config(tmp_path: Path):
    """use_vllm with TRL's default correction: with no loss_config, and with a core preset, the loss config carries
    GRPOConfig's mode and bounds (and off_policy_mask_threshold); nothing in args changes."""
    args = _args(tmp_path, use_vllm=True, vllm_importance_sampling_clip_min=0.5, off_policy_mask_threshold=0.1)
    for loss_config in (None, "dr_grpo", LossConfig.preset("dapo", clip_high=0.3)):
        config, changes = resolve_loss_config(loss_config, args)
        assert (config.sampling_correction, config.sampling_clip_min, config.sampling_clip_max) == (
            "sequence_mask",
            0.5,
            3.0,
        )
        assert config.off_policy_mask_threshold == 0.1
        assert not {name for name in changes if name.startswith("vllm") or name.startswith("off_policy")}
    off, _ = resolve_loss_config("dr_grpo", _args(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False))
    assert off.sampling_correction is None  # the user switched TRL's correction off
    plain, _ = resolve_loss_config("dr_grpo", _args(tmp_path))
    assert plain.sampling_correction is None and plain.off_policy_mask_threshold is None  # no vLLM, no sampler


def test_a_loss_configs_own_correction_sets_default_fields_and_refuses_contradictions(tmp_path: Path):
    own = LossConfig.preset("dapo", sampling_correction="token_mask", sampling_clip_min=0.5)
    config, changes = resolve_loss_config(own, _args(tmp_path, use_vllm=True))
    assert config.sampling_correction == "token_mask"
    assert changes["vllm_importance_sampling_mode"] == "token_mask"
    assert changes["vllm_importance_sampling_clip_min"] == 0.5
    contradicting = _args(tmp_path, use_vllm=True, vllm_importance_sampling_mode="token_truncate")
    with pytest.raises(ValueError, match=r"vllm_importance_sampling_mode='token_truncate' contradicts") as error:
        resolve_loss_config(own, contradicting)
    assert "sampling_correction='token_truncate'" in str(error.value)
    with pytest.raises(
        ValueError, match=r"sampling_correction='token_mask'.*set use_vllm=True.*sampling_correction=None"
    ):
        resolve_loss_config(own, _args(tmp_path))
    with command_line_hints(), pytest.raises(ValueError, match="--use_vllm true") as cli:
        resolve_loss_config(own, _args(tmp_path))
    assert '"sampling_correction": null' in str(cli.value)
    masked = LossConfig.preset("dapo", off_policy_mask_threshold=0.5)
    assert resolve_loss_config(masked, _args(tmp_path))[1]["off_policy_mask_threshold"] == 0.5
    with pytest.raises(ValueError, match=r"off_policy_mask_threshold=0\.3 contradicts"):
        resolve_loss_config(masked, _args(tmp_path, off_policy_mask_threshold=0.3))
