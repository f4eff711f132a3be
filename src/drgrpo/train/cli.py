"""The ``drgrpo`` command line: ``train``, ``eval`` and ``plot``.

Every flag of ``drgrpo train`` is generated from a dataclass field (kebab-case name, the field's
docstring as help), so the CLI and :class:`drgrpo.train.TrainConfig` cannot drift apart:

    drgrpo train --output-dir runs/default                  # built-in task and model, about 2 minutes on CPU
    drgrpo train --model PATH --dataset train.jsonl --reward mymod:correct --loss grpo --beta 0.0
    drgrpo train --resume runs/default --steps 200          # continue exactly where it stopped
    drgrpo eval --model runs/default/checkpoints/step_000120
    drgrpo plot runs/default                                # runs/default/plots/*.png
    torchrun --nproc-per-node 2 -m drgrpo train ...         # DDP (gloo on CPU)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Flags that are not plain fields, or fields not exposed as flags.
_TRAIN_SKIP = {"loss_overrides", "task", "warm_start", "rewards", "reward_weights"}
_LOSS_SKIP = {"name", "max_completion_length_", "per_call_normalization"}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (parsed from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _add_fields(
    parser: argparse._ArgumentGroup, cls: type, prefix: str, dest_prefix: str, skip: set[str], default_text: str = ""
) -> None:
    """One flag per dataclass field; values land in ``dest_prefix + name`` only when given (SUPPRESS)."""
    from drgrpo.train.config import parse_value

    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(getattr(defaults, f.name)):
            continue
        default = getattr(defaults, f.name)
        help_text = f"{docs.get(f.name, '')} (default: {default_text or default})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest_prefix + f.name, "default": argparse.SUPPRESS, "help": help_text}
        ann = str(f.type)
        if ann == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif ann == "int":
            kwargs["type"] = int
        elif ann == "float":
            kwargs["type"] = float
        elif ann in ("str", "str | None"):
            kwargs["type"] = str
        else:  # Literal choices, optional numbers: a Python literal or a bare word
            kwargs["type"] = parse_value
        if "action" not in kwargs:
            kwargs.setdefault("metavar", f.name.upper())
        parser.add_argument(_flag(prefix, f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from drgrpo.config import LossConfig, preset_names
    from drgrpo.train.config import TrainConfig, WarmStartConfig
    from drgrpo.train.task import TaskConfig
    from drgrpo.train.tiny import TinyModelConfig

    parser = argparse.ArgumentParser(
        prog="drgrpo",
        description="Dr. GRPO and the GRPO family: train, evaluate, plot.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # ---- train
    tr = sub.add_parser(
        "train",
        help="train with Dr. GRPO (or any GRPO-family loss)",
        description=(
            "Without --model: build a tiny Llama-style model locally, warm-start it on the built-in addition task, "
            "then run Dr. GRPO on it (about 2 minutes on a 2-core CPU). With --model PATH: any local Hugging Face "
            "causal LM. Writes OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/checkpoints/."
        ),
    )
    run = tr.add_argument_group("run")
    _add_fields(run, TrainConfig, "", "train.", _TRAIN_SKIP)
    run.add_argument(
        "--reward",
        dest="train.rewards",
        action="append",
        default=argparse.SUPPRESS,
        metavar="MODULE:FUNCTION",
        help="a reward callable (completion: str, example: dict) -> float; repeat for several. The first is the "
        "correctness reward behind 'accuracy'. Default: drgrpo.train.task:exact_match (the built-in task).",
    )
    run.add_argument(
        "--reward-weights",
        dest="train.reward_weights",
        nargs="+",
        type=float,
        default=argparse.SUPPRESS,
        metavar="W",
        help="one weight per --reward (default: 1 each)",
    )
    loss = tr.add_argument_group(
        "loss", f"--loss picks a preset ({', '.join(preset_names())}); these flags override its fields."
    )
    _add_fields(loss, LossConfig, "", "loss.", _LOSS_SKIP, default_text="the --loss preset's")
    task = tr.add_argument_group("built-in task (without --dataset)")
    _add_fields(task, TaskConfig, "task-", "task.", set())
    ws = tr.add_argument_group("warm start of the built-in model (without --model)")
    _add_fields(ws, WarmStartConfig, "warm-start-", "warm_start.", set())
    _add_fields(ws, TinyModelConfig, "tiny-", "tiny.", set())

    # ---- eval
    ev = sub.add_parser(
        "eval",
        help="held-out accuracy and lengths of a checkpoint or local model",
        description="Evaluate --model (e.g. DIR/checkpoints/step_000120) on the held-out split it was trained "
        "with (the built-in task by default) or on --eval-dataset.",
    )
    ev.add_argument("--model", required=True, help="checkpoint or local Hugging Face model directory")
    for name in (
        "eval_dataset",
        "prompt_field",
        "max_new_tokens",
        "eval_size",
        "eval_temperature",
        "top_p",
        "device",
        "dtype",
        "seed",
    ):
        f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
        typ = {"int": int, "float": float}.get(str(f.type), str)
        ev.add_argument(
            _flag("", name),
            dest="train." + name,
            type=typ,
            default=argparse.SUPPRESS,
            help=field_docs(TrainConfig).get(name, ""),
        )
    ev.add_argument(
        "--reward",
        dest="train.rewards",
        action="append",
        default=argparse.SUPPRESS,
        metavar="MODULE:FUNCTION",
        help="reward callables (default: those of the checkpoint's run)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    # ---- plot
    pl = sub.add_parser("plot", help="plot a run's metrics.jsonl to DIR/plots/*.png")
    pl.add_argument("run_dir", help="a drgrpo train output directory")
    pl.add_argument("--smooth", type=int, default=5, help="moving-average window of per-step curves (default: 5)")

    # ---- compare: the length-bias experiment
    from drgrpo.train import compare as compare_module

    cp = sub.add_parser(
        "compare",
        help="train once per loss and seed from one warm start; plot lengths of correct vs incorrect",
    )
    compare_module.add_arguments(cp)
    return parser


def _split(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Given flags grouped by their dest prefix ('train.lr' -> {'train': {'lr': ...}})."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = value
    return groups


def train_config_from_args(ns: argparse.Namespace) -> Any:
    """The TrainConfig of ``drgrpo train``: defaults (or the resumed run's config) + the flags given."""
    from drgrpo.train.checkpoint import find_checkpoint, read_state
    from drgrpo.train.config import TrainConfig

    given = _split(ns)
    tr = dict(given.get("train", {}))
    if tr.get("resume"):
        ckpt = find_checkpoint(tr["resume"])
        base = TrainConfig.from_dict(read_state(ckpt)["train_config"])
        tr.setdefault("output_dir", str(ckpt.parent.parent))
    else:
        base = TrainConfig()
    for key in ("rewards", "reward_weights"):
        if key in tr:
            tr[key] = tuple(tr[key])
    overrides = dict(base.loss_overrides)
    overrides.update(given.get("loss", {}))
    tr["loss_overrides"] = tuple(sorted(overrides.items()))
    if "task" in given:
        tr["task"] = dataclasses.replace(base.task, **given["task"])
    ws = base.warm_start
    if "tiny" in given:
        ws = dataclasses.replace(ws, model=dataclasses.replace(ws.model, **given["tiny"]))
    if "warm_start" in given:
        ws = dataclasses.replace(ws, **given["warm_start"])
    tr["warm_start"] = ws
    return base.replace(**tr)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass

    try:
        if ns.command == "train":
            from drgrpo.train.trainer import train

            config = train_config_from_args(ns)
            result = train(config)
            first = result.evals[0]["eval/accuracy"] if result.evals else None
            last = result.evals[-1]["eval/accuracy"] if result.evals else None
            if int(__import__("os").environ.get("RANK", "0")) == 0:
                print(
                    f"done: step {result.step} in {result.seconds:.1f}s"
                    + (f", held-out accuracy {first:.3f} -> {last:.3f}" if first is not None else "")
                    + f"; metrics {result.output_dir / 'metrics.jsonl'}; checkpoint {result.checkpoint}"
                    + (" (interrupted)" if result.interrupted else "")
                )
            return 130 if result.interrupted else 0
        if ns.command == "eval":
            from drgrpo.train.config import TrainConfig
            from drgrpo.train.evaluation import evaluate_model, saved_train_config
            from drgrpo.train.model import check_model_dir

            check_model_dir(ns.model)
            base = saved_train_config(ns.model) or TrainConfig()
            given = _split(ns).get("train", {})
            if "rewards" in given:
                given["rewards"] = tuple(given["rewards"])
                given.setdefault("reward_weights", ())
            report = evaluate_model(ns.model, base.replace(**given))
            if ns.json:
                print(json.dumps(report))
            else:
                for k, v in report.items():
                    print(f"{k:24s} {_fmt(v)}")
            return 0
        if ns.command == "compare":
            from drgrpo.train.compare import compare, config_from_args

            print(compare(config_from_args(ns)))
            return 0
        if ns.command == "plot":
            from drgrpo.train.plots import plot_run

            for path in plot_run(Path(ns.run_dir), smooth=ns.smooth):
                print(path)
            return 0
    except (ValueError, FileNotFoundError, TypeError) as exc:
        # configuration errors: one clear line, no traceback
        print(f"drgrpo {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
