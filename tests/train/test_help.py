"""Help and errors written for people: flags named as flags, no docstring markup or Python values.

The scan reads the help of ``drgrpo`` and of each sub-command and looks for what code-facing text leaks:
RST/Sphinx markup (double backquotes, roles such as :func:), the Python spellings of values (None, True,
False, [], ()), the names of configuration fields (``eval_size``) where a flag (--eval-size) is meant, two
defaults for one flag, flags without help, and flags named in a help string that the command does not have.
The oracle is the list of field names, read from the dataclasses here, not from the help builder.
Configuration errors are checked word for word (hand-written expected lines): on the command line they
name flags, from Python the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from drgrpo.config import LossConfig, preset_names
from drgrpo.field_error import FieldError
from drgrpo.train.cli import main as cli
from drgrpo.train.cli.compare import CompareConfig
from drgrpo.train.cli.main import build_parser, main
from drgrpo.train.loop.task import TaskConfig
from drgrpo.train.loop.tiny import TinyModelConfig
from drgrpo.train.train_config import EvalConfig, TrainConfig, WarmStartConfig

COMMANDS = ("train", "eval", "compare", "plot")
CONFIGS = (TrainConfig, WarmStartConfig, TinyModelConfig, TaskConfig, LossConfig, EvalConfig, CompareConfig)
FIELD_NAMES = sorted({f.name for cls in CONFIGS for f in dataclasses.fields(cls) if "_" in f.name})
"""Field names that cannot be mistaken for a word: the ones with an underscore (eval_size, clip_high, ...)."""

MARKUP = re.compile(r"``|`|:(?:func|class|mod|attr|meth|data|obj|ref|doc|py):")
PYTHON_VALUES = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|\[\]|\(\)")
FIELD = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, FIELD_NAMES)) + r")(?![\w/-])")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
LOSS_FLAGS = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(LossConfig)} | {"--max-completion-length"}
LOSS_FLAGS |= {"--no-" + flag[2:] for flag in LOSS_FLAGS}
"""The loss flags (and their --no- forms): the loss group's description says their resume class."""


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise AssertionError(f"no sub-command {name}")


def help_pages() -> dict[str, tuple[argparse.ArgumentParser, str]]:
    parser = build_parser()
    pages = {"drgrpo": (parser, parser.format_help())}
    for name in COMMANDS:
        sub = subparser(parser, name)
        pages[name] = (sub, sub.format_help())
    return pages


def problems(text: str) -> list[str]:
    """What a help text or an error message must not contain, each found instance named."""
    found = [f"markup {m.group(0)!r}" for m in MARKUP.finditer(text)]
    found += [f"Python value {m.group(0)!r}" for m in PYTHON_VALUES.finditer(text)]
    found += [f"field name {m.group(1)!r} (a flag is meant)" for m in FIELD.finditer(text)]
    found += [f"class-qualified field {m.group(0)!r}" for m in re.finditer(r"\b[A-Z]\w*Config\.\w+", text)]
    return found


def test_the_scan_finds_what_it_looks_for():
    # the scanner's own oracle: hand-written bad and good lines
    bad = (
        "Operands in ``0..max_operand``; see :func:`drgrpo.x`. (default: None) (default: []) eval_size "
        "TrainConfig.dtype must be"
    )
    assert problems(bad) == [
        "markup '``'",
        "markup '``'",
        "markup ':func:'",
        "markup '`'",
        "markup '`'",
        "Python value 'None'",
        "Python value '[]'",
        "field name 'max_operand' (a flag is meant)",
        "field name 'eval_size' (a flag is meant)",
        "class-qualified field 'TrainConfig.dtype'",
    ]
    good = "Held-out prompts per evaluation (--eval-size); presets dr_grpo, low_var_kl; none: off (default: on)"
    assert problems(good) == []


@pytest.mark.parametrize("page", ["drgrpo", *COMMANDS])
def test_help_has_no_markup_python_values_or_field_names(page: str):
    _, text = help_pages()[page]
    found = problems(text)
    assert found == [], f"drgrpo {page} --help shows {len(found)} problem(s): {found}"


@pytest.mark.parametrize("page", COMMANDS)
def test_every_flag_has_help_one_default_and_names_only_real_flags(page: str):
    parser, _ = help_pages()[page]
    have = {opt[2:] for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        text = " ".join((action.help or "").split())
        assert text, f"drgrpo {page} {name} has no help"
        assert text.count("(default") <= 1, f"drgrpo {page} {name} shows two defaults: {text}"
        assert text[0].isupper(), f"drgrpo {page} {name}: help should read as a sentence: {text}"
        for flag in FLAG.findall(text):
            assert flag in have, f"drgrpo {page} {name} names --{flag}, which drgrpo {page} does not have"


def flag_helps(page: str) -> dict[str, str]:
    parser, _ = help_pages()[page]
    return {opt: " ".join((a.help or "").split()) for a in parser._actions for opt in a.option_strings}


def test_booleans_show_on_or_off():
    helps = flag_helps("train")
    assert "memory for a large vocabulary. (default: off) On --resume" in helps["--fused"]
    assert "even without a KL penalty. (default: on) On --resume" in helps["--ref-kl"]
    # --reward-weights used to show "(default 1 each) ... (default: [])"; an unset default is said in words
    assert (
        "Not set: 1 for each. On --resume" in helps["--reward-weights"] and "(default" not in helps["--reward-weights"]
    )


RESUME_SAYS = {
    "meaning": "On --resume: changed only by a branch.",
    "checkpoint": "On --resume: set by the checkpoint, even for a branch.",
    "free": "On --resume: may be changed.",
}
"""What train's help says of each resume class (docs/faults.md, "Resume", points the user to it)."""


@pytest.mark.slow
def test_train_help_ends_each_flag_with_what_a_resume_does_with_it():
    helps = flag_helps("train")
    # hand-picked flags of each class, nested ones included (the oracle: docs/faults.md's classes)
    for flag, kind in {"--lr": "meaning", "--reward": "meaning", "--task-max-operand": "meaning",
                       "--clip-high": "meaning", "--model": "checkpoint", "--warm-start-steps": "checkpoint",
                       "--tiny-hidden-size": "checkpoint", "--steps": "free", "--fused": "free",
                       "--no-progress": "free", "--keep-checkpoints": "free"}.items():  # fmt: skip
        if flag == "--clip-high":  # a loss flag: its group says it
            _, text = help_pages()["train"]
            assert f"Presets: {PRESETS}. {RESUME_SAYS[kind]}" in " ".join(text.split())
        else:
            assert helps[flag].endswith(RESUME_SAYS[kind]), (flag, helps[flag])
    # every flag of train but where the run is says one of them once; eval and compare have no --resume
    for flag, text in helps.items():
        said = [kind for kind, words in RESUME_SAYS.items() if words in text]
        expected = 0 if flag in ("-h", "--help", "--config", "--output-dir", "--resume") else 1
        expected = 0 if flag in LOSS_FLAGS else expected
        assert len(said) == expected and (not said or text.endswith(RESUME_SAYS[said[0]])), (flag, text)
    for page in ("eval", "compare"):
        assert "On --resume" not in help_pages()[page][1], page


def test_eval_usage_shows_model_as_required():
    _, text = help_pages()["eval"]
    usage = " ".join(text.split("\n\n")[0].split())
    assert "--model MODEL" in usage and "[--model MODEL]" not in usage, usage


def test_compare_help_describes_the_flags_it_has():
    parser, text = help_pages()["compare"]
    flat = " ".join(text.split())
    have = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--losses", "--seeds", "--beta"} <= have
    assert not {"--loss", "--seed", "--resume", "--progress"} & have
    assert "Every flag of drgrpo train applies" not in flat
    # the description says what replaces each train flag compare does not have
    for absent, instead in (("--loss", "--losses"), ("--seed", "--seeds")):
        assert f"{absent} " in flat and instead in flat, (absent, instead)
    assert "--resume" in flat


def test_help_quotes_no_run_time():
    # the README quotes the measured time of the default run; --help must not quote a different figure
    for page, (_, text) in help_pages().items():
        flat = " ".join(text.split())
        assert not re.search(r"\b(about|takes|in) \d+(\.\d+)? ?(s|seconds|minutes?|min)\b", flat), (page, flat)


def test_version_prints_the_installed_package_version(capsys):
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    expected = pyproject["project"]["version"]
    assert importlib.metadata.version("drgrpo") == expected  # the editable install of this tree
    with pytest.raises(SystemExit) as exit_:  # (python -m drgrpo in a real process: test_exit_codes.py)
        cli.main(["--version"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    assert out.strip() == f"drgrpo {expected}"


# ----------------------------------------------------------------------------- error messages

PRESETS = ", ".join(preset_names())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--eval-size", "-1"], "--eval-size must be >= 0, got -1"),
        (["train", "--steps", "0"], "--steps must be a positive integer, got 0"),
        (["train", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (
            ["train", "--reward", "a:b", "--reward-weights", "1", "2"],
            "--reward-weights has 2 weight(s) for 1 reward(s); give one weight per reward",
        ),
        (["train", "--loss", "nope"], f"--loss: unknown preset 'nope'; valid presets: {PRESETS}"),
        (["train", "--clip-high", "0"], "--clip-high must be positive, got 0.0"),
        (["train", "--delta", "1.1"], "--delta must be > 1 + --clip-high = 1.2, got 1.1"),
        (["train", "--clip-low", "none"], "--clip-low none (no lower clip) needs --surrogate 'cispo', got 'ppo'"),
        (["train", "--std-eps", "inf"], "--std-eps must be finite, got inf"),
        (
            ["train", "--task-max-operand", "0"],
            "--task-max-operand must be in 1..999, got 0: the task holds every operand pair in memory, "
            "(--task-max-operand + 1)^2 of them (1,000,000 at 999)",
        ),
        (
            ["train", "--task-answer-noise", "0.95"],
            "--task-answer-noise must be in [0, 0.9) for --task-noise-kind 'digit' (the right answer must stay the "
            "most likely one), got 0.95",
        ),
        (
            ["train", "--forced-aggregation", "token-mean", "--beta", "0.1"],
            "--forced-aggregation 'token-mean' differs from --aggregation 'seq-mean-token-sum-norm' while --beta is "
            "0.1: the peer (verl's sapo) aggregates its surrogate term one way and its KL term the other, but drgrpo "
            "applies one rule to both; set --aggregation to 'token-mean' or --beta to 0",
        ),
        (
            ["train", "--max-completion-length", "16", "--max-new-tokens", "8"],
            "--max-completion-length 16 and --max-new-tokens 8 disagree: both set the generation budget, which is "
            "also Dr. GRPO's constant L; give --max-new-tokens only",
        ),
        (["compare", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["compare", "--beta", "-1"], "--beta must be >= 0, got -1.0"),
        (["compare", "--losses", "grpo,nope"], f"--losses: unknown loss preset(s) nope; valid presets: {PRESETS}"),
        (["compare", "--eval-size", "-1"], "--eval-size must be >= 0, got -1"),
        (["compare", "--task-max-work", "-2"], "--task-max-work must be >= 0, got -2"),
    ],
)
def test_configuration_errors_name_the_flags(tmp_path: Path, capsys, argv: list[str], message: str):
    out = tmp_path / "out"
    assert main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"drgrpo {argv[0]}: error: {message}\n"
    assert problems(err) == []
    assert not out.exists()  # the error came before any work


def test_compare_names_loss_settings_by_its_flags():
    # a bad loss flag of compare surfaces when its runs are built (after the warm start): its names, checked here
    names = subparser(build_parser(), "compare").get_default("flag_names")
    with pytest.raises(FieldError) as info:
        LossConfig(clip_high=-1.0)
    assert info.value.renamed(names) == "--clip-high must be positive, got -1.0"
    assert names[(TrainConfig, "max_new_tokens")] == "--max-new-tokens" and (LossConfig, "beta") not in names


def test_eval_errors_name_its_flags(tmp_path: Path, capsys, monkeypatch):
    # eval's flags set the evaluated run's fields: a bad one is named by its eval flag
    import drgrpo.train.loop.evaluation as evaluation
    import drgrpo.train.run.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "resolve_model_dir", lambda path: Path(path))
    monkeypatch.setattr(evaluation, "saved_train_config", lambda path: TrainConfig())
    assert main(["eval", "--model", str(tmp_path), "--eval-size", "-3"]) == 2
    assert capsys.readouterr().err == "drgrpo eval: error: --eval-size must be >= 1 (prompts), got -3\n"
    assert main(["eval"]) == 2
    assert "drgrpo eval: error: drgrpo eval needs --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(eval_size=-1), "eval_size must be >= 0, got -1"),
        (lambda: TrainConfig(dtype="float64"), "dtype must be float32, bfloat16 or float16, got 'float64'"),  # type: ignore[arg-type]
        (lambda: LossConfig(delta=1.1), "delta must be > 1 + clip_high = 1.2, got 1.1"),
        (
            lambda: TaskConfig(max_operand=0),
            "max_operand must be in 1..999, got 0: the task holds every operand pair in memory, (max_operand + 1)^2 "
            "of them (1,000,000 at 999)",
        ),
        (lambda: TrainConfig(output_dir=""), "output_dir must name a directory, got ''"),
        (
            lambda: TinyModelConfig(num_heads=5),
            "num_heads 5 does not split hidden_size 64 into heads of an even width (rotary position embeddings turn "
            "a head's dimensions in pairs); num_heads can be 1, 2, 4, 8, 16 or 32",
        ),
        (lambda: CompareConfig(seeds=0), "seeds must be >= 1, got 0"),
    ],
)
def test_python_callers_read_field_names(make, message: str):
    # the same checks from Python name the fields as Python does, without a class prefix
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


def test_field_error_renames_only_whole_field_names():
    error = FieldError(TrainConfig, ("steps", "max_new_tokens"), "steps 3 < max_steps; max_new_tokens 2 (steps)")
    names = {(TrainConfig, "steps"): "--steps", (TrainConfig, "max_new_tokens"): "--max-new-tokens"}
    assert error.renamed(names) == "--steps 3 < max_steps; --max-new-tokens 2 (--steps)"
    assert error.renamed({(LossConfig, "steps"): "--x"}) == str(error)  # another dataclass's field: unchanged
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))  # drgrpo compare's runs send errors between processes
    assert (type(copy), copy.owner, copy.fields, str(copy)) == (FieldError, TrainConfig, error.fields, str(error))


def test_version_from_a_tree_that_is_not_installed(monkeypatch):
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == "unknown"


# ----------------------------------------------------------------------------- drgrpo alone, train's examples

DRGRPO = Path(sys.executable).with_name("drgrpo")
"""The console script the install made (the command a user types)."""


@pytest.mark.slow
def test_bare_drgrpo_prints_the_help_and_exits_2():
    # no command is a usage error (argparse's status 2), answered with the whole help rather than one line;
    # the oracle is what drgrpo --help prints (status 0, on stdout)
    bare = subprocess.run([str(DRGRPO)], capture_output=True, text=True, timeout=120)
    asked = subprocess.run([str(DRGRPO), "--help"], capture_output=True, text=True, timeout=120)
    assert (asked.returncode, asked.stderr) == (0, "")
    assert asked.stdout.startswith("usage: drgrpo") and "train" in asked.stdout
    assert (bare.returncode, bare.stdout, bare.stderr) == (2, "", asked.stdout)


def epilog_commands(text: str) -> list[list[str]]:
    """The drgrpo train command lines of a help text (indented, continuation lines joined), as argv lists."""
    joined = text.replace("\\\n", " ")
    lines = [ln.split("#")[0].strip() for ln in joined.splitlines() if ln.startswith("  ")]
    return [shlex.split(ln) for ln in lines if "drgrpo train " in ln]


def test_train_help_shows_examples_that_parse_and_says_rewards_need_pythonpath():
    parser, text = help_pages()["train"]
    commands = epilog_commands(text)
    assert len(commands) >= 4, text
    for argv in commands:
        env = [a for a in argv[: argv.index("drgrpo")] if "=" in a]
        args = argv[argv.index("train") + 1 :]
        parser.parse_args(args)  # every flag exists and takes the values shown (a bad one exits)
        if "--reward" in args:  # the example with a reward module sets PYTHONPATH to where that module is
            module, _, function = args[args.index("--reward") + 1].partition(":")
            (path,) = [e.partition("=")[2] for e in env if e.startswith("PYTHONPATH=")]
            source = (Path(__file__).parents[2] / path / f"{module}.py").read_text()
            assert f"def {function}(" in source
    flat = " ".join(text.split())
    assert "must be importable" in flat and "PYTHONPATH" in flat, flat


@pytest.mark.slow
def test_the_drgrpo_command_does_not_import_rewards_from_the_current_directory(tmp_path: Path):
    # what train's help says: the console script finds a reward module on PYTHONPATH, not in the current
    # directory (python -m drgrpo would); a missing module is a configuration error before any work (exit 2)
    (tmp_path / "here_reward.py").write_text("def f(completion, example):\n    return 0.0\n")
    argv = [str(DRGRPO), "train", "--reward", "here_reward:f", "--dataset", "missing.jsonl", "--output-dir", "out"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    alone = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert alone.returncode == 2
    assert alone.stderr.startswith("drgrpo train: error: reward 'here_reward:f': cannot import module 'here_reward'")
    on_path = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**env, "PYTHONPATH": str(tmp_path)})  # fmt: skip
    # imported now: the next check, the dataset, is the one that fails
    assert on_path.returncode == 2
    assert on_path.stderr == "drgrpo train: error: --dataset 'missing.jsonl' does not exist (expected a JSONL file)\n"
    assert not (tmp_path / "out").exists()
