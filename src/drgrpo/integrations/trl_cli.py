"""TRL's ``trl grpo`` command line, training with ``DrGRPOTrainer``: ``python -m drgrpo.integrations.trl``.

It takes what ``trl grpo`` takes, parsed by TRL's own ``TrlParser``: a YAML file (``--config``, with an ``env``
section) and flags, over TRL's script arguments (``dataset_name``, ``reward_funcs``,
``reward_model_name_or_path``, ...), every ``GRPOConfig`` field, every ``ModelConfig`` field (model path, dtype,
LoRA) and the dataset mixture (``datasets:``); plus drgrpo's three, ``loss_config``, ``fused`` and ``advantage``
(:class:`DrGRPOArguments`). The run is ``trl grpo``'s: load the dataset (the Hub, a local directory of
JSON/Parquet/CSV files, or a mixture), build the reward functions (TRL's registry names or a dotted path), train,
save the model to ``output_dir``. Under ``accelerate launch`` every process runs it::

    python -m drgrpo.integrations.trl --config recipe.yaml
    accelerate launch --config_file zero3.yaml -m drgrpo.integrations.trl --config recipe.yaml --learning_rate 2e-6
    drgrpo trl --config recipe.yaml                 # the same command

Exit codes: 0 done; 2 a configuration error, before training (one line on stderr); a failure during training
raises as in ``trl grpo``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from drgrpo.config import LossConfig, preset_config

__all__ = ["TRL_REWARDS", "DrGRPOArguments", "build_parser", "loss_config_from", "main", "reward_function"]

TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment")
"""The reward names ``trl grpo`` knows (``get_soft_overlong_punishment`` with ``max_completion_len=1280`` and
``soft_punish_cache=256``, as there); any other name is a dotted path ``package.module.function``."""


@dataclass
class DrGRPOArguments:
    """drgrpo's arguments beside TRL's."""

    loss_config: str | None = field(
        default=None,
        metadata={
            "help": "The loss: a drgrpo preset name (dr_grpo, grpo, dapo, gspo, trl.grpo, ...), or in the YAML file a "
            "mapping of a preset and LossConfig fields ({preset: dr_grpo, clip_high: 0.28}; on the command line as "
            "JSON). Presets that divide by a constant L take L from --max_completion_length unless the mapping sets "
            "max_completion_length. Not set: the loss --loss_type describes, as stock TRL computes it."
        },
    )
    fused: bool = field(
        default=False,
        metadata={"help": "Compute the loss from the last hidden states and lm_head, without the logits tensor."},
    )
    advantage: str = field(
        default="grpo",
        metadata={
            "help": "The outcome advantage estimator: grpo (the loss config's group advantages), rloo, "
            "reinforce_plus_plus_baseline, opo, grpo_passk or gpg (drgrpo.outcome_advantages)."
        },
    )


def build_parser(prog: str | None = None) -> Any:
    """TRL's ``TrlParser`` over ``trl grpo``'s dataclasses and :class:`DrGRPOArguments`."""
    from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig, TrlParser
    from trl.scripts.grpo import GRPOScriptArguments

    dataclasses: Any = (GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig, DrGRPOArguments)
    return TrlParser(dataclasses, prog=prog)


def main(argv: Sequence[str] | None = None, *, trainer_cls: type, prog: str | None = None) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` by default) like ``trl grpo``, train with ``trainer_cls``, save the model.

    ``trainer_cls`` is ``DrGRPOTrainer`` (``drgrpo.integrations.trl`` passes it in; this module does not import it).
    """
    prog = prog or "python -m drgrpo.integrations.trl"
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        script_args, training_args, model_args, dataset_args, drgrpo_args = parser.parse_args_and_config(argv)
        trainer = _build_trainer(script_args, training_args, model_args, dataset_args, drgrpo_args, trainer_cls)
    except (ValueError, TypeError, KeyError, ImportError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Training completed; model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    end: Callable[[], Any] | None = getattr(trainer, "end", None)  # transformers >= 5.18: trackers, process group
    if end is not None:
        end()
    return 0


def loss_config_from(value: Any, max_completion_length: int | None) -> LossConfig | str | None:
    """``loss_config`` as given: ``None``, a preset name, or a mapping (or a JSON object) of ``preset`` and fields.

    A mapping whose preset divides by a constant L takes ``max_completion_length`` unless it sets its own.
    """
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--loss_config {value!r} is not a preset name or a JSON object: {error}") from None
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"--loss_config must be a preset name or a mapping with a preset key, got {value!r}")
    fields = dict(value)
    name = fields.pop("preset", None)
    if not isinstance(name, str):
        raise ValueError(f"--loss_config {value!r} has no preset: add preset: <name> (e.g. preset: dr_grpo)")
    config = preset_config(name).replace(**fields)
    if config.divides_by_constant_length:
        fields.setdefault("max_completion_length", max_completion_length)  # the generation budget, as for a name
    return LossConfig.preset(name, **fields)


def reward_function(name: str) -> Callable[..., Any]:
    """A reward by TRL's registry name (:data:`TRL_REWARDS`) or dotted path ``package.module.function``.

    ``module:function`` (drgrpo train's form) works too; the working directory is importable, as in ``trl grpo``.
    """
    from trl import rewards

    if name == "get_soft_overlong_punishment":
        return rewards.get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256)  # type: ignore[no-any-return]
    if name in TRL_REWARDS:
        return getattr(rewards, name)  # type: ignore[no-any-return]
    module_name, sep, attribute = name.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ValueError(
            f"reward function {name!r} is neither one of TRL's ({', '.join(TRL_REWARDS)}) nor a dotted path "
            "package.module.function"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"reward function {name!r}: cannot import {module_name!r}: {error}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"reward function {name!r}: module {module_name!r} has no function {attribute!r}")
    return function  # type: ignore[no-any-return]


def _build_trainer(
    script_args: Any, training_args: Any, model_args: Any, dataset_args: Any, drgrpo_args: Any, trainer_cls: Any
) -> Any:
    """Everything ``trl grpo`` sets up, then ``trainer_cls`` with drgrpo's two arguments."""
    from trl import get_peft_config, get_quantization_config

    rewards: list[Any] = []
    if script_args.reward_model_name_or_path:
        rewards.append(script_args.reward_model_name_or_path)
    rewards += [reward_function(name) for name in script_args.reward_funcs or []]
    if not rewards:
        raise ValueError("no reward: set --reward_funcs (TRL's names or dotted paths) or --reward_model_name_or_path")
    if not model_args.model_name_or_path:
        raise ValueError("no model: set --model_name_or_path (a local directory or a Hub name)")

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    dataset = _load_dataset(script_args, dataset_args)
    splits = list(dataset.keys())
    if script_args.dataset_train_split not in dataset:
        split = script_args.dataset_train_split
        raise ValueError(f"the dataset has no split {split!r} (--dataset_train_split; its splits: {splits})")
    evaluating = training_args.eval_strategy != "no"
    if evaluating and script_args.dataset_test_split not in dataset:
        raise ValueError(
            f"--eval_strategy is {str(getattr(training_args.eval_strategy, 'value', training_args.eval_strategy))!r} "
            "but the dataset has no split "
            f"{script_args.dataset_test_split!r} (--dataset_test_split; its splits: {splits})"
        )
    from drgrpo.integrations.trl_settings import command_line_hints

    with command_line_hints():  # the trainer's errors and warnings give flags, not Python
        return trainer_cls(
            model=model_args.model_name_or_path,
            reward_funcs=rewards,
            args=training_args,
            train_dataset=dataset[script_args.dataset_train_split],
            eval_dataset=dataset[script_args.dataset_test_split] if evaluating else None,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
            loss_config=loss_config_from(drgrpo_args.loss_config, training_args.max_completion_length),
            fused=drgrpo_args.fused,
            advantage=drgrpo_args.advantage,
        )


def _load_dataset(script_args: Any, dataset_args: Any) -> Any:
    """The mixture (``datasets:``) if given, else ``load_dataset(dataset_name, dataset_config)``, as ``trl grpo``."""
    if dataset_args.datasets:
        from trl import get_dataset

        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise ValueError("no dataset: set --dataset_name (a Hub name or a local directory) or --datasets (a mixture)")
    from datasets import load_dataset

    return load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )
