"""The ``drgrpo`` command line: ``train``, ``eval``, ``compare``, ``plot`` and ``trl``.

The flags of ``train``, ``eval`` and ``compare`` are generated from their configuration dataclasses
(:class:`~drgrpo.train.config.TrainConfig` with :class:`~drgrpo.LossConfig`,
:class:`~drgrpo.train.config.EvalConfig`, :class:`~drgrpo.train.compare.CompareConfig`) by one builder
(:mod:`drgrpo.train.flags`): kebab-case names, the field docstrings as help. Each also reads
``--config FILE`` (YAML or TOML, keys = flag names), overridden by the flags given::

    drgrpo train --output-dir runs/default                  # built-in task and model, about 2 minutes on CPU
    drgrpo train --model PATH --dataset train.jsonl --reward mymod:correct --loss grpo --beta 0.0
    drgrpo train --config runs/default/config.yaml --output-dir runs/again   # rerun a run
    drgrpo train --resume runs/default --steps 400          # continue exactly where it stopped
    drgrpo eval --model runs/default                        # its latest checkpoint
    drgrpo plot runs/default                                # runs/default/plots/*.png
    torchrun --nproc-per-node 2 -m drgrpo train ...         # DDP (gloo on CPU)
    drgrpo trl --config recipe.yaml                         # TRL's trainer: trl grpo's flags + --loss_config

Exit codes: 0 done, 2 a configuration error (one line, before any work), 1 a failure during training
(after the last completed step was saved), 130 stopped by SIGINT/SIGTERM (after a checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drgrpo.config import LossConfig, preset_names
from drgrpo.train.checkpoint import find_checkpoint, read_state
from drgrpo.train.compare import CompareConfig
from drgrpo.train.config import EvalConfig, TrainConfig
from drgrpo.train.data import RewardError
from drgrpo.train.flags import add_flags, given, nested_replace, parse_with_config

LOSS_SKIP = ("name", "per_call_normalization")
"""LossConfig fields that are not flags: the preset's name, and a property of peer presets."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drgrpo",
        description="Dr. GRPO and the GRPO family: train, evaluate, compare, plot.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "YAML or TOML file of flags (keys are flag names without dashes); flags given here override it"

    tr = sub.add_parser(
        "train",
        help="train with Dr. GRPO (or any GRPO-family loss)",
        description=(
            "Without --model: build a tiny Llama-style model locally, warm-start it on the built-in addition task, "
            "then run Dr. GRPO on it (about 2 minutes on a 2-core CPU). With --model PATH: any local Hugging Face "
            "causal LM. Writes OUTPUT_DIR/config.yaml, OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/checkpoints/."
        ),
    )
    tr.add_argument("--config", metavar="FILE", help=config_help)
    add_flags(tr.add_argument_group("run"), TrainConfig, "train")
    loss = tr.add_argument_group("loss", f"--loss picks a preset ({', '.join(preset_names())}); these override it.")
    add_flags(loss, LossConfig, "loss", default_text="the --loss preset's", skip=LOSS_SKIP)

    ev = sub.add_parser(
        "eval",
        help="held-out accuracy and lengths of a checkpoint, a run or a local model",
        description="Evaluate --model on the held-out set it was trained with (the built-in task by default) or on "
        "--eval-dataset. Unset flags take the values of the run that made the model.",
    )
    ev.add_argument("--config", metavar="FILE", help=config_help)
    add_flags(ev, EvalConfig, "eval")

    cp = sub.add_parser(
        "compare",
        help="train once per loss and seed from one initial policy; plot lengths of correct vs incorrect",
        description=(
            "The length-bias experiment of Dr. GRPO (docs/length-bias.md): every loss trained with every seed\n"
            "from one warm start (or --model), then a report of reward, accuracy and the lengths of correct and\n"
            "incorrect completions. Every flag of drgrpo train applies to every run."
        ),
        epilog=(
            "Task variant for the length bias, a model that answers right at greedy decoding and samples\n"
            "mistakes it could see in its own prefix:\n"
            "  --task-answer-noise 0.3 --warm-start-target-accuracy 0.9 --warm-start-steps 3000 \\\n"
            "  --task-max-work 8 --max-new-tokens 12   (add --task-noise-kind symbol for a mistake visible\n"
            "  as a token). --task-work-position before puts the working tokens before the answer.\n"
            "Results, and the controlled policy that isolates the mechanism (drgrpo.length_bias):\n"
            "docs/length-bias.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cp.add_argument("--config", metavar="FILE", help=config_help)
    add_flags(cp, CompareConfig, "compare")
    add_flags(
        cp.add_argument_group("loss"), LossConfig, "loss", default_text="each preset's", skip=(*LOSS_SKIP, "beta")
    )

    sub.add_parser(
        "trl",
        help="TRL's GRPO trainer with drgrpo's loss: trl grpo's flags and config files, plus --loss_config and "
        "--fused (drgrpo trl --help lists them)",
        add_help=False,
    )

    pl = sub.add_parser("plot", help="plot a run's metrics.jsonl to DIR/plots/*.png")
    pl.add_argument("run_dir", help="a drgrpo train output directory")
    pl.add_argument("--smooth", type=int, default=5, help="moving-average window of per-step curves (default: 5)")
    return parser


def with_loss_overrides(config: Any, groups: dict[str, dict[str, Any]]) -> Any:
    """``config`` (a TrainConfig) with the loss flags given merged into its ``loss_overrides``."""
    overrides = {**dict(config.loss_overrides), **groups.get("loss", {})}
    return config.replace(loss_overrides=tuple(sorted(overrides.items())))


def train_config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``drgrpo train``: the defaults (or the resumed run's config) + the flags given."""
    groups = given(ns)
    resume = groups.get("train", {}).get("resume")
    if resume:
        ckpt = find_checkpoint(resume)
        base = TrainConfig.from_dict(read_state(ckpt)["train_config"])
        groups["train"].setdefault("output_dir", str(ckpt.parent.parent))
    else:
        base = TrainConfig()
    return with_loss_overrides(nested_replace(base, groups, "train"), groups)  # type: ignore[no-any-return]


def compare_config_from_args(ns: argparse.Namespace) -> CompareConfig:
    """The CompareConfig of ``drgrpo compare``: its defaults + the flags given (train and loss flags: every run's)."""
    groups = given(ns)
    config: CompareConfig = nested_replace(CompareConfig(), groups, "compare")
    return dataclasses.replace(config, train=with_loss_overrides(config.train, groups))


def eval_config_from_args(ns: argparse.Namespace) -> EvalConfig:
    return EvalConfig(**given(ns).get("eval", {}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trl"]:  # TRL's own parser takes the rest (drgrpo.integrations.trl_cli)
        from drgrpo.integrations.trl import main as trl_main

        return trl_main(argv[1:], prog="drgrpo trl")
    ns = parser.parse_args(argv)  # usage errors exit here (code 2)
    _quiet_transformers()
    try:
        ns = parse_with_config(parser, argv)
        if ns.command == "train":
            return _train(train_config_from_args(ns))
        if ns.command == "eval":
            return _eval(eval_config_from_args(ns))
        if ns.command == "compare":
            from drgrpo.train.compare import compare

            print(compare(compare_config_from_args(ns)))
            return 0
        if ns.command == "plot":
            from drgrpo.train.plots import plot_run

            for path in plot_run(Path(ns.run_dir), smooth=ns.smooth):
                print(path)
            return 0
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"drgrpo {ns.command}: error: {exc}", file=sys.stderr)  # configuration errors: one line
        return 2
    except (RewardError, FloatingPointError) as exc:  # a failed step (anything else: Python's own traceback)
        return _failure(exc)
    return 1


def _train(config: TrainConfig) -> int:
    from drgrpo.train.trainer import train

    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        first = result.evals[0]["eval/accuracy"] if result.evals else None
        last = result.evals[-1]["eval/accuracy"] if result.evals else None
        print(
            f"done: step {result.step} in {result.seconds:.1f}s"
            + (f", held-out accuracy {first:.3f} -> {last:.3f}" if first is not None and last is not None else "")
            + f"; metrics {result.output_dir / 'metrics.jsonl'}; checkpoint {result.checkpoint}"
            + (" (interrupted)" if result.interrupted else "")
        )
    return 130 if result.interrupted else 0


def _eval(config: EvalConfig) -> int:
    from drgrpo.train.checkpoint import resolve_model_dir
    from drgrpo.train.evaluation import evaluate_model, saved_train_config

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


def _failure(exc: BaseException) -> int:
    """A failure during training: its cause in one paragraph, with the user's own traceback for a reward."""
    cause = exc.__cause__
    if isinstance(exc, RewardError) and cause is not None:
        frames = traceback.extract_tb(cause.__traceback__)[1:]  # drop drgrpo's call_reward frame: the user's code
        print("Traceback of the reward (most recent call last):", file=sys.stderr)
        print("".join(traceback.format_list(frames)).rstrip(), file=sys.stderr)
    print(f"drgrpo train: error: {type(exc).__name__}: {exc}", file=sys.stderr)
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
