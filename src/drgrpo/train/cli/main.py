"""The ``drgrpo`` command line: ``train``, ``eval``, ``compare``, ``plot`` and ``trl``.

The flags of ``train``, ``eval`` and ``compare`` come from their configuration dataclasses
(:mod:`drgrpo.train.flags`); each reads ``--config FILE`` too. A configuration error is one line naming the flag.
Exit codes: 0 done, 2 a configuration error (before any work), 1 a failed step (after the last completed step was
saved; the phase that raised decides, :mod:`drgrpo.train.cli.failures`), 130 stopped by SIGINT/SIGTERM;
``drgrpo`` alone prints the help on stderr and exits with 2. Examples and the ``--max-completion-length`` alias:
docs/design.md, section 9.13; every fault: docs/faults.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drgrpo.config import LossConfig, preset_names
from drgrpo.field_error import FieldError
from drgrpo.train.cli.compare import CompareConfig, compare
from drgrpo.train.cli.failures import StepFailed, train_or_fail
from drgrpo.train.cli.pipes import reader_may_leave
from drgrpo.train.cli.plots import plot_run
from drgrpo.train.flags import Flag, add_flags, flag_names, given, nested_replace, parse_with_config
from drgrpo.train.loop.data import RewardError
from drgrpo.train.loop.rewards import reward_traceback
from drgrpo.train.run.checkpoint import check_checkpoint, find_checkpoint, read_state, resolve_model_dir
from drgrpo.train.run.disk import WriteFailed
from drgrpo.train.run.stopping import FailedElsewhere, Interrupted
from drgrpo.train.train_config import EvalConfig, TrainConfig, resume_help

LOSS_SKIP = ("name", "per_call_normalization")
"""LossConfig fields that are not flags: the preset's name, and a property of peer presets."""
LENGTH_ALIAS = "max_completion_length"
"""The LossConfig field that is no loss flag: L is --max-new-tokens, and --max-completion-length its hidden alias."""

EXIT_CODES = (
    "Exit status: 0 done; 2 a configuration error, reported in one line before any work; 1 a failure during "
    "training, after the last completed step was saved; 130 stopped by SIGINT or SIGTERM, after a checkpoint."
)

TRAIN_EXAMPLES = (
    "Examples:\n\n"
    "  drgrpo train --output-dir runs/default               # the built-in task and model\n"
    "  drgrpo train --output-dir runs/grpo --loss grpo --steps 100\n"
    "  drgrpo train --resume runs/default --steps 400       # continue where it stopped\n"
    "  drgrpo train --config runs/default/config.yaml --output-dir runs/again   # rerun a run\n"
    "  PYTHONPATH=examples drgrpo train --model runs/my-model --dataset examples/data/train.jsonl \\\n"
    "      --reward my_rewards:correct --max-new-tokens 4 --output-dir runs/my-run\n\n"
    "A reward MODULE:FUNCTION is imported by its module name, so the module must be importable where drgrpo runs: "
    "installed, or in a directory on PYTHONPATH (examples/my_rewards.py above; the drgrpo command does not search "
    "the current directory, python -m drgrpo does). Without --reward the reward is the exact match of each "
    "example's answer field."
)
"""The epilog of drgrpo train --help: command lines to start from, and where reward modules are found."""

FAILURES = (RewardError, FloatingPointError, WriteFailed, FailedElsewhere)
"""The errors a failed run reports in one paragraph (exit code 1), raised by a step or not; any other error of a
step is raised with its traceback."""

NO_COMMAND = 2
"""The exit status of a bare ``drgrpo``: the help on stderr and 2, argparse's status for a usage error (``drgrpo
--help`` prints the same help on stdout and exits 0)."""


class HelpFormatter(argparse.HelpFormatter):
    """Help for people: flags never break at their hyphens, and descriptions keep their paragraphs.

    A description or epilog is paragraphs separated by blank lines, each wrapped to the terminal; a
    paragraph whose lines start with two spaces (a command line) is printed as written.
    """

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if paragraph.startswith("  "):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                words = " ".join(paragraph.split())
                paragraphs.append(
                    textwrap.fill(words, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
                )
        return "\n\n".join(paragraphs)


def version() -> str:
    """The installed package's version (its metadata), or "unknown" when run from a source tree not installed."""
    try:
        return importlib.metadata.version("drgrpo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drgrpo",
        description="Dr. GRPO and the GRPO family of policy losses: train, evaluate, compare, plot.",
        epilog="Run drgrpo COMMAND --help for the flags of a command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"drgrpo {version()}", help="Print the version.")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    config_help = (
        "A YAML or TOML file of flags: its keys are flag names without the dashes; flags given on the command "
        "line override it."
    )

    tr = sub.add_parser(
        "train",
        help="Train a policy with Dr. GRPO or another GRPO-family loss.",
        usage="%(prog)s [--config FILE] [flags]",
        description=(
            "Train a policy with Dr. GRPO or another GRPO-family loss.\n\n"
            "Without --model: build a tiny Llama-style model, warm-start it on the built-in addition task and "
            "train it on that task; this runs on a CPU in minutes (the README gives a measured time). With "
            "--model DIR: any local Hugging Face causal LM, with --dataset and --reward.\n\n"
            "Writes OUTPUT_DIR/config.yaml (drgrpo train --config reruns it), OUTPUT_DIR/metrics.jsonl and "
            "OUTPUT_DIR/checkpoints/. Dr. GRPO's constant L is --max-new-tokens."
        ),
        epilog=f"{TRAIN_EXAMPLES}\n\n{EXIT_CODES}",
        formatter_class=HelpFormatter,
    )
    tr.add_argument("--config", metavar="FILE", help=config_help)
    train_flags = add_flags(tr.add_argument_group("run"), TrainConfig, "train", note=resume_help)
    _add_loss_flags(tr, train_flags, "the --loss preset", "the preset's", note=resume_help("loss_overrides"))

    ev = sub.add_parser(
        "eval",
        help="Held-out accuracy and lengths of a checkpoint, a run or a local model.",
        usage="%(prog)s --model MODEL [--config FILE] [flags]",
        description="Evaluate --model on the held-out prompts of the run that made it (the built-in task's by "
        "default) or on --eval-dataset. A flag not given takes the value of that run.",
        formatter_class=HelpFormatter,
    )
    ev.add_argument("--config", metavar="FILE", help=config_help)
    eval_flags = add_flags(ev, EvalConfig, "eval", unset_text="the run's")
    # eval's flags set the evaluated run's TrainConfig fields of the same names: its errors name them too
    ev.set_defaults(flag_names={**flag_names(eval_flags), **_as_train_fields(eval_flags)})

    cp = sub.add_parser(
        "compare",
        help="Train every loss with every seed from one initial policy; report the lengths of correct and "
        "incorrect completions.",
        usage="%(prog)s [--config FILE] [flags]",
        description=(
            "The length-bias experiment of Dr. GRPO (docs/length-bias.md): every loss of --losses trained with "
            "every seed of --seeds from one warm start (or --model), then a report of reward, held-out accuracy "
            "and the lengths of correct and incorrect completions.\n\n"
            "The flags of drgrpo train set every run alike, with these differences: --losses takes the place of "
            "--loss and --seeds of --seed (the runs of each loss use seeds 0 to N-1); --output-dir is the "
            "comparison's directory (run N of loss X writes to OUTPUT_DIR/runs/X/seedN); --beta sets the KL "
            "coefficient of every loss (default 0, not the preset's); the loss flags override that setting of "
            "every preset; --threads is per run (default 1). There is no --resume and no progress bar: the same "
            "command again continues the comparison (the cached warm start and the finished runs are kept, a run "
            "that stopped part-way resumes exactly, the missing ones are trained; other settings are refused).\n\n"
            "A signal (Ctrl-C, SIGTERM) or a failed run stops every run, each after saving its last completed "
            "step, and writes the report of the runs that finished (exit code 130, or 1). The report says what "
            "the lengths show; the reasons: docs/length-bias.md."
        ),
        epilog=(
            "Task variant for the length bias, a model that answers right at greedy decoding and samples "
            "mistakes it could see in its own prefix:\n\n"
            "  --task-answer-noise 0.3 --warm-start-target-accuracy 0.9 --warm-start-steps 3000 \\\n"
            "  --task-max-work 8 --max-new-tokens 12\n\n"
            "Add --task-noise-kind symbol for a mistake visible as a token; --task-work-position before puts "
            "the working tokens before the answer. Results, and the controlled policy that isolates the "
            "mechanism (drgrpo.length_bias): docs/length-bias.md."
        ),
        formatter_class=HelpFormatter,
    )
    cp.add_argument("--config", metavar="FILE", help=config_help)
    compare_flags = add_flags(cp, CompareConfig, "compare")
    _add_loss_flags(cp, compare_flags, "every preset in --losses", "each preset's", skip=("beta",))  # --beta: compare's

    sub.add_parser(
        "trl",
        help="TRL's GRPO trainer with drgrpo's loss: trl grpo's flags and config files, plus --loss_config and "
        "--fused (drgrpo trl --help lists them).",
        add_help=False,
    )

    pl = sub.add_parser(
        "plot",
        help="Plot a run's metrics.jsonl to RUN_DIR/plots/*.png.",
        description="Plot the metrics of a drgrpo train run to RUN_DIR/plots/*.png.",
        formatter_class=HelpFormatter,
    )
    pl.add_argument("run_dir", metavar="RUN_DIR", help="A drgrpo train output directory (holding metrics.jsonl).")
    pl.add_argument(
        "--smooth",
        type=int,
        default=5,
        metavar="STEPS",
        help="Moving-average window of the per-step curves, in steps (default: 5).",
    )
    return parser


def _add_loss_flags(
    parser: argparse.ArgumentParser,
    others: list[Flag],
    presets: str,
    default_text: str,
    skip: Sequence[str] = (),
    note: str | None = None,
) -> None:
    """The loss flags of ``parser`` (one per LossConfig field, each overriding ``presets``' setting), and the
    names its errors give fields: the loss flags and ``others``, the command's other flags. ``note``: a sentence
    the group's description ends with (train's: what a resume does with them).

    L is no loss flag (it is --max-new-tokens); --max-completion-length, TRL's name for the generation
    budget, is accepted as a hidden alias of --max-new-tokens (see :func:`with_length_alias`).
    """
    description = f"Each flag overrides one setting of {presets}. Presets: {', '.join(preset_names())}."
    group = parser.add_argument_group("loss", f"{description} {note}" if note else description)
    loss_flags = add_flags(group, LossConfig, "loss", default_text=default_text, skip=(*LOSS_SKIP, LENGTH_ALIAS, *skip))
    parser.add_argument(
        "--max-completion-length",
        dest=f"alias.{LENGTH_ALIAS}",
        type=int,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    parser.set_defaults(flag_names=flag_names([*others, *loss_flags]))


def _as_train_fields(flags: Sequence[Flag]) -> dict[tuple[type, str], str]:
    return {(TrainConfig, flag.field): f"--{flag.name}" for flag in flags}


def with_loss_overrides(config: TrainConfig, groups: dict[str, dict[str, Any]]) -> TrainConfig:
    """``config`` with the loss flags given merged into its ``loss_overrides``."""
    overrides = {**dict(config.loss_overrides), **groups.get("loss", {})}
    return config.replace(loss_overrides=tuple(sorted(overrides.items())))


def with_length_alias(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``groups`` with --max-completion-length given as --max-new-tokens (an error if both differ).

    Dr. GRPO's L is the generation budget: one value, --max-new-tokens. TRL calls the budget
    max_completion_length, so that flag is accepted too, as the same value.
    """
    alias = groups.pop("alias", {}).get(LENGTH_ALIAS)
    if alias is None:
        return groups
    train = groups.setdefault("train", {})
    budget = train.get("max_new_tokens", alias)
    if budget != alias:
        raise ValueError(
            f"--max-completion-length {alias} and --max-new-tokens {budget} disagree: both set the generation "
            "budget, which is also Dr. GRPO's constant L; give --max-new-tokens only"
        )
    train["max_new_tokens"] = alias
    return groups


def train_config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``drgrpo train``: the defaults (or the resumed run's config) + the flags given."""
    groups = with_length_alias(given(ns))
    resume = groups.get("train", {}).get("resume")
    if resume:
        ckpt = check_checkpoint(find_checkpoint(resume))  # a damaged one: the file, and the newest intact one
        base = TrainConfig.from_dict(read_state(ckpt)["train_config"])
        groups["train"].setdefault("output_dir", str(ckpt.parent.parent))
    else:
        base = TrainConfig()
    return with_loss_overrides(nested_replace(base, groups, "train"), groups)


def compare_config_from_args(ns: argparse.Namespace) -> CompareConfig:
    """The CompareConfig of ``drgrpo compare``: its defaults + the flags given (train and loss flags: every run's)."""
    groups = with_length_alias(given(ns))
    config: CompareConfig = nested_replace(CompareConfig(), groups, "compare")
    return dataclasses.replace(config, train=with_loss_overrides(config.train, groups))


def eval_config_from_args(ns: argparse.Namespace) -> EvalConfig:
    return EvalConfig(**given(ns).get("eval", {}))


def main(argv: Sequence[str] | None = None) -> int:
    """``drgrpo ARGV``: the command's exit code. A reader that stops reading its output (``| head``) loses only the
    output: the command goes on to its end and exits with its own code (:mod:`drgrpo.train.cli.pipes`)."""
    with reader_may_leave():
        return _main(argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trl"]:  # TRL's own parser takes the rest (drgrpo.integrations.trl_cli)
        from drgrpo.integrations.trl import main as trl_main

        return trl_main(argv[1:], prog="drgrpo trl")
    if not argv:  # no command: the help, as the answer to a usage error
        parser.print_help(sys.stderr)
        return NO_COMMAND
    ns = parser.parse_args(argv)  # usage errors exit here (code 2)
    failed: BaseException | None = None
    _quiet_transformers()
    try:
        ns = parse_with_config(parser, argv)
        if ns.command == "train":
            return _train(train_config_from_args(ns))
        if ns.command == "eval":
            return _eval(eval_config_from_args(ns))
        if ns.command == "compare":
            report = compare(compare_config_from_args(ns))  # a signal or a failed run: raised after the report
            if report is not None:
                print(report)
            return 0
        if ns.command == "plot":
            for path in plot_run(Path(ns.run_dir), smooth=ns.smooth):
                print(path)
            return 0
    except StepFailed as exc:  # raised by a step, after the set-up: a failure (exit 1), whatever its type
        failed = exc.cause
    except FAILURES as exc:
        return _failure(exc, ns.command)
    except (ValueError, FileNotFoundError, TypeError) as exc:  # raised before any work: a configuration error
        message = exc.renamed(getattr(ns, "flag_names", {})) if isinstance(exc, FieldError) else str(exc)
        print(f"drgrpo {ns.command}: error: {message}", file=sys.stderr)  # configuration errors: one line, with flags
        return 2
    except (KeyboardInterrupt, Interrupted):  # a signal outside a run's steps (which stop with 130 themselves)
        print(f"drgrpo {ns.command}: stopped by a signal", file=sys.stderr)
        return 130
    if isinstance(failed, FAILURES):
        return _failure(failed, ns.command)
    if failed is not None:
        raise failed  # any other error of a step: Python's own traceback (exit code 1), as it was raised
    return 1


def _train(config: TrainConfig) -> int:
    result = train_or_fail(config)
    if int(os.environ.get("RANK", "0")) == 0:
        first = result.evals[0]["eval/accuracy"] if result.evals else None
        last = result.evals[-1]["eval/accuracy"] if result.evals else None
        print(
            ("stopped by a signal" if result.interrupted else "done")
            + f": step {result.step} in {result.seconds:.1f}s"
            + (f", held-out accuracy {first:.3f} -> {last:.3f}" if first is not None and last is not None else "")
            + f"; metrics {result.output_dir / 'metrics.jsonl'}; checkpoint {result.checkpoint}"
        )
    return 130 if result.interrupted else 0


def _eval(config: EvalConfig) -> int:
    from drgrpo.train.loop.evaluation import evaluate_model, saved_train_config  # transformers: loaded when needed

    if config.model is None:
        raise ValueError("drgrpo eval needs --model (a checkpoint, a run directory or a model directory)")
    model_dir = resolve_model_dir(config.model)
    report = evaluate_model(model_dir, config.train_config(saved_train_config(model_dir) or TrainConfig()))
    if config.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:24s} {f'{value:.4g}' if isinstance(value, float) else value}")
    return 0


def _failure(exc: BaseException, command: str = "train") -> int:
    """A failure during training: its cause in one paragraph, with the user's own traceback for a reward."""
    frames = reward_traceback(exc)
    if frames:
        print("Traceback of the reward (most recent call last):", file=sys.stderr)
        print(frames, file=sys.stderr)
    kind = "" if isinstance(exc, (WriteFailed, FailedElsewhere)) else f"{type(exc).__name__}: "  # says it all
    print(f"drgrpo {command}: error: {kind}{exc}", file=sys.stderr)
    return 1


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
