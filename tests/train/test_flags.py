"""One flag builder for train, eval and compare: every field has a flag, config files read like flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drgrpo.config import LossConfig
from drgrpo.train import EvalConfig, TrainConfig
from drgrpo.train.cli.compare import CompareConfig
from drgrpo.train.cli.main import (
    LOSS_SKIP,
    build_parser,
    compare_config_from_args,
    eval_config_from_args,
    main,
    train_config_from_args,
)
from drgrpo.train.flags import flags_of, parse_with_config
from helpers.cli_runs import TINY


def subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]


def options(name: str) -> set[str]:
    return {opt for action in subparser(name)._actions for opt in action.option_strings}


def walk(cls: type, defaults=None, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, expected flag) for every leaf field, written out independently of the builder."""
    out = []
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            nested = f.metadata.get("prefix", f.name.replace("_", "-") + "-")
            skip = set(f.metadata.get("skip", ()))
            out += [
                (f"{f.name}.{p}", flag) for p, flag in walk(type(value), value, nested) if p.split(".")[0] not in skip
            ]
        elif f.metadata.get("flag", "") is not None:
            out.append((f.name, "--" + prefix + f.metadata.get("flag", f.name.replace("_", "-"))))
        else:
            assert f.metadata.get("via"), f"{cls.__name__}.{f.name} has no flag and does not say where it comes from"
    return out


@pytest.mark.parametrize(
    ("command", "classes"),
    [("train", [TrainConfig, LossConfig]), ("eval", [EvalConfig]), ("compare", [CompareConfig, LossConfig])],
)
def test_every_field_has_a_flag_with_its_docstring_as_help(command, classes):
    have = options(command)
    help_text = " ".join(subparser(command).format_help().split())
    for cls in classes:
        skip = set(LOSS_SKIP) | ({"beta"} if command == "compare" else set()) if cls is LossConfig else set()
        for path, flag in walk(cls):
            if path in skip:
                continue
            assert flag in have, f"drgrpo {command}: {cls.__name__}.{path} has no flag {flag}"
    # the help of a flag is its field's docstring (first words), e.g. TrainConfig.group_size and LossConfig.clip_high
    if command != "eval":
        assert "Completions sampled per prompt (G)." in help_text
        assert "Upper clip range eps_high" in help_text
    assert "--config" in have


def test_the_walk_sees_nested_prefixes():
    # the oracle of the test above: nested dataclasses get their prefixes, compare's per-run fields are skipped
    flags = dict(walk(TrainConfig))
    assert flags["task.max_operand"] == "--task-max-operand"
    assert flags["warm_start.model.hidden_size"] == "--tiny-hidden-size"
    assert flags["rewards"] == "--reward" and "loss_overrides" not in flags
    compare = dict(walk(CompareConfig))
    assert compare["train.steps"] == "--steps" and "train.output_dir" not in compare and "train.seed" not in compare
    builder = {flag.name for flag, _, _ in flags_of(TrainConfig, "train") if flag is not None}
    assert {f[2:] for f in flags.values()} == builder


TRAIN_ARGS = ["--loss", "dapo", "--clip-high", "0.3", "--lr", "1e-4", "--no-ref-kl", "--task-max-operand", "20",
              "--tiny-hidden-size", "32", "--reward", "a:b", "--reward", "c:d", "--reward-weights", "1", "0.5",
              "--clip-low", "none"]  # fmt: skip
YAML = """
loss: dapo
clip-high: 0.3
lr: 1.0e-4
ref-kl: false
task-max-operand: 20
tiny_hidden_size: 32   # underscores work too
reward: [a:b, c:d]
reward-weights: [1, 0.5]
clip-low: null
"""
TOML = """
loss = "dapo"
clip-high = 0.3
lr = 1e-4
ref-kl = false
task-max-operand = 20
tiny-hidden-size = 32
reward = ["a:b", "c:d"]
reward-weights = [1, 0.5]
clip-low = "none"
"""


def parse_train(argv: list[str]) -> TrainConfig:
    return train_config_from_args(parse_with_config(build_parser(), ["train", *argv]))


def test_flags_build_the_expected_config():
    cfg = parse_train(TRAIN_ARGS)
    expected = TrainConfig(
        loss="dapo",
        lr=1e-4,
        ref_kl=False,
        rewards=("a:b", "c:d"),
        reward_weights=(1.0, 0.5),
        loss_overrides=(("clip_high", 0.3), ("clip_low", None)),
    )
    expected = expected.replace(
        task=dataclasses.replace(expected.task, max_operand=20),
        warm_start=dataclasses.replace(
            expected.warm_start, model=dataclasses.replace(expected.warm_start.model, hidden_size=32)
        ),
    )
    assert cfg == expected


@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "text"), [(".yaml", YAML), (".toml", TOML)])
def test_a_config_file_equals_the_same_flags(tmp_path: Path, suffix: str, text: str):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert parse_train(["--config", str(path)]) == parse_train(TRAIN_ARGS)
    # flags on the command line override the file, the file's other keys stay
    over = parse_train(
        ["--config", str(path), "--lr", "0.5", "--reward", "x:y", "--reward-weights", "2", "--clip-high", "0.25"]
    )
    assert over.lr == 0.5 and over.rewards == ("x:y",) and dict(over.loss_overrides)["clip_high"] == 0.25
    assert over.task.max_operand == 20 and over.loss == "dapo"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 1\nno-such-flag: 3\n", "unknown key 'no-such-flag' (not a flag of this command); valid keys: "),
        ("ref-kl: 3\n", "key 'ref-kl' must be true or false, got 3"),
        ("lr: [1, 2]\n", "key 'lr' takes one value, got [1, 2]"),
        ("- lr\n", "expected a mapping of flag names to values, got list"),
        ("lr: [\n", "not valid YAML"),
        ("lr: fast\n", "argument --lr: expected a number, got 'fast'"),
        ("loss: dapo\nkl: k9\n", "argument --kl: invalid choice 'k9' (choose from k1, k2, k3, low_var_kl, abs)"),
        (
            "forced-aggregation: mean\n",
            "(choose from token-mean, seq-mean-token-mean, seq-mean-token-sum, "
            "seq-mean-token-sum-norm, token-sum, token-sum-norm, none)",
        ),
    ],
)
def test_bad_config_files_are_named(tmp_path: Path, capsys, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_a_config_file_of_the_wrong_kind(tmp_path: Path, capsys):
    path = tmp_path / "run.json"
    path.write_text("{}")
    assert main(["train", "--config", str(path)]) == 2
    assert "expected a .yaml, .yml or .toml file" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_and_compare_read_config_files_too(tmp_path: Path):
    (tmp_path / "e.yaml").write_text("model: runs/x\neval-size: 7\nreward: [m:f]\njson: true\n")
    ev = eval_config_from_args(parse_with_config(build_parser(), ["eval", "--config", str(tmp_path / "e.yaml")]))
    assert ev == EvalConfig(model="runs/x", eval_size=7, rewards=("m:f",), json=True)
    (tmp_path / "c.toml").write_text('losses = "dapo,gspo"\nseeds = 2\nsteps = 9\ntask-max-work = 6\nclip-high = 0.3\n')
    argv = ["compare", "--config", str(tmp_path / "c.toml"), "--seeds", "4"]
    cp = compare_config_from_args(parse_with_config(build_parser(), argv))
    assert cp.losses == ("dapo", "gspo") and cp.seeds == 4
    assert cp.train.steps == 9 and cp.train.task.max_work == 6 and dict(cp.train.loss_overrides) == {"clip_high": 0.3}


def test_the_resolved_config_round_trips():
    cfg = parse_train([*TRAIN_ARGS, "--steps", "17", "--task-work-position", "before", "--eval-dataset", "e.jsonl"])
    flags = cfg.to_flags()
    assert flags["steps"] == 17 and flags["reward"] == ["a:b", "c:d"] and flags["clip-high"] == 0.3
    assert set(flags) >= {"output-dir", "task-max-operand", "warm-start-steps", "tiny-hidden-size", "fused"}


@pytest.mark.slow
def test_a_run_writes_its_config_and_reruns_from_it_bit_for_bit(tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--output-dir", str(first), "--steps", "2", "--eval-every", "0", "--seed", "3", *TINY]) == 0
    written = first / "config.yaml"
    assert written.read_text().startswith("# drgrpo train --config this-file reruns this run")
    cfg = parse_train(["--config", str(written)])
    assert cfg == parse_train(["--output-dir", str(first), "--steps", "2", "--eval-every", "0", "--seed", "3", *TINY])
    assert main(["train", "--config", str(written), "--output-dir", str(second)]) == 0
    a = load_file(str(first / "checkpoints" / "step_000002" / "model.safetensors"))
    b = load_file(str(second / "checkpoints" / "step_000002" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- Dr. GRPO's L: one value


@pytest.mark.slow
def test_L_is_the_generation_budget_given_once():
    # one flag sets both the budget and L
    cfg = parse_train(["--max-new-tokens", "12"])
    assert (cfg.max_new_tokens, cfg.loss_config().max_completion_length) == (12, 12)
    # TRL's name for the budget is accepted (not shown in --help) and means the same
    alias = parse_train(["--max-completion-length", "12"])
    assert alias == cfg
    assert parse_train(["--max-completion-length", "12", "--max-new-tokens", "12"]) == cfg
    help_text = subparser("train").format_help()
    assert "--max-new-tokens" in help_text and "--max-completion-length" not in help_text
    # a config file may use either key
    assert cfg.to_flags()["max-new-tokens"] == 12 and "max-completion-length" not in cfg.to_flags()


@pytest.mark.slow
def test_L_given_twice_with_different_values_is_an_error(tmp_path: Path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--max-new-tokens", "8", "--max-completion-length", "16", "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("drgrpo train: error: --max-completion-length 16 and --max-new-tokens 8 disagree")
    assert not out.exists()
    (tmp_path / "c.yaml").write_text("max-completion-length: 6\n")
    assert parse_train(["--config", str(tmp_path / "c.yaml")]).max_new_tokens == 6
    cp = compare_config_from_args(parse_with_config(build_parser(), ["compare", "--max-completion-length", "6"]))
    assert cp.train.max_new_tokens == 6 and cp.train.loss_config().max_completion_length == 6


def test_L_in_python_follows_max_new_tokens():
    assert TrainConfig(max_new_tokens=6).loss_config().max_completion_length == 6
    same = TrainConfig(max_new_tokens=6, loss_overrides=(("max_completion_length", 6),))
    assert same.loss_config().max_completion_length == 6
    for other in (16, None):  # None (no constant L) contradicts it as well
        with pytest.raises(ValueError, match=f"max_completion_length {other} .* disagrees with max_new_tokens 6"):
            TrainConfig(max_new_tokens=6, loss_overrides=(("max_completion_length", other),))


def test_a_resume_class_outside_the_three_and_an_unknown_field_are_named():
    from drgrpo.train.train_config import flag, on_resume

    with pytest.raises(ValueError, match=r"^on_resume must be one of meaning, checkpoint, free, got 'sometimes'$"):
        flag(1, on_resume="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^TrainConfig has no field 'lrr'$"):
        on_resume("lrr")
    # one flag of each class, as docs/faults.md lists them
    assert (on_resume("lr"), on_resume("model"), on_resume("steps")) == ("meaning", "checkpoint", "free")
