"""The run's set-up checks: :func:`check_run` makes every check a run can make before any work and returns the
:class:`RunPlan` the trainer starts from; here too the checks of the loop's inputs (dataset prompts against the
model's tokenizer and context, the answers the default reward reads).

Each check raises a ValueError that names the flag or the file, what it found and what was expected;
``drgrpo train`` prints it on one line and exits with code 2, before the warm start. The checks that need
nothing of the loop (device, output directory, tensorboard, loss inputs) are :mod:`drgrpo.train.run.preflight`;
the numeric flags are checked earlier still, by the configuration dataclasses (:mod:`drgrpo.train.train_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drgrpo.config import LossConfig
from drgrpo.train.loop.data import Example, Rewards, load_examples
from drgrpo.train.loop.model import check_finite_files, check_local_code, context_length, load_tokenizer
from drgrpo.train.loop.rollout import prompt_texts
from drgrpo.train.loop.tiny import VOCAB, build_tokenizer
from drgrpo.train.run.checkpoint import resolve_model_dir
from drgrpo.train.run.preflight import check_device, check_loss_inputs, check_output_dir, check_tensorboard
from drgrpo.train.run.resume import RunStart, plan_run
from drgrpo.train.train_config import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    """What :func:`check_run` found a run will use, every part of it checked."""

    loss_config: LossConfig
    """The loss: the preset with its overrides and L = --max-new-tokens."""
    rewards: Rewards
    """The reward callables, imported."""
    start: RunStart
    """New, resumed or branched: the checkpoint to start from, its step and the run's history."""
    model_dir: Path | None
    """The initial model (--model), a local directory; None: the built-in warm start."""
    train_examples: list[Example]
    """The training prompts (--dataset, or the built-in task's train split)."""
    eval_examples: list[Example]
    """The held-out prompts (--eval-dataset, or the task's held-out split; empty: no evaluation)."""


def check_run(config: TrainConfig) -> RunPlan:
    """Every check a run can make before any work, in the order a user would fix them.

    The flags' combination (--dtype float16), the loss preset and its overrides, the reward imports, the resume
    (a damaged checkpoint, a refused flag), the model's need for its own Python code, every dataset line (empty,
    too long for the model, not UTF-8, words the built-in tokenizer lacks), the answer field the default reward
    reads, the device, the tensorboard package, then the output directory. Each
    raises a ValueError naming the flag or file (``drgrpo train`` exits with code 2), nothing is loaded onto a
    device and nothing is written but the output directory itself.
    """
    config.check_trainable()  # --dtype float16
    loss_config = config.loss_config()  # unknown preset or bad override: a ValueError listing the valid ones
    check_loss_inputs(loss_config)  # options whose inputs this trainer does not make (a sampler's log-probs)
    rewards = Rewards.from_specs(config.rewards, config.reward_weights)  # import errors now, not at step 1
    start = plan_run(config)  # new, resumed or branched: a damaged checkpoint or a refused flag is an error here
    model_dir = resolve_model_dir(config.model) if config.model else None
    weights_dir = start.checkpoint or model_dir
    if weights_dir is not None:
        check_local_code(weights_dir)  # a model that needs its own Python code is refused, never run
        check_finite_files(weights_dir)  # a NaN or an infinity in the weights: refused before anything is written
    check = prompt_check(weights_dir, config)  # --max-new-tokens must leave room for a prompt in the context
    train_examples, eval_examples = load_examples(
        config.dataset, config.eval_dataset, config.prompt_field, config.task, check
    )  # every dataset prompt checked: empty, too long
    if config.dataset is None:  # the built-in task: every prompt has the same number of tokens
        check_task_prompt(check, train_examples[0]["prompt"])
    check_answers(config, train_examples, eval_examples)  # without --reward: every example needs its answer
    check_device(config.device)
    check_tensorboard(config.tensorboard)
    check_output_dir(config.output_dir)  # a file, or not writable
    return RunPlan(loss_config, rewards, start, model_dir, train_examples, eval_examples)


def check_task_prompt(check: PromptCheck, prompt: str) -> None:
    """The built-in task's prompts (all of ``prompt``'s length) and ``--max-new-tokens`` fit the model's context."""
    problem = check(prompt)
    if problem is not None:
        raise ValueError(f"the built-in task's prompts ({prompt!r}, --task-max-operand): {problem}")


CHARS_PER_TOKEN = 64
"""A prompt longer than this many characters per token of room is measured on a prefix only: the tokens of its
first ``CHARS_PER_TOKEN * room`` characters. No tokenizer packs more characters into a token on ordinary text, so a
huge prompt is refused after tokenizing a bounded prefix, never the whole of it."""


@dataclass(frozen=True)
class PromptCheck:
    """Whether a dataset prompt fits the model: ``check(prompt)`` returns what is wrong with it, or None.

    A prompt is templated and tokenized as the rollout does it (:func:`drgrpo.train.loop.rollout.generate`); it must
    have at least one token, and its tokens plus ``max_new_tokens`` must fit the model's ``context`` (prompt and
    completion share the position embeddings). :func:`drgrpo.train.loop.data.load_jsonl` adds the file and the line.
    """

    tokenizer: Any
    """The policy's tokenizer (with its chat template, if any)."""
    context: int | None
    """The model's context in tokens (max_position_embeddings); None: unknown, only emptiness is checked."""
    max_new_tokens: int
    """The generation budget of every completion (--max-new-tokens)."""
    source: str = "the model's config"
    """Where ``context`` comes from, for the message."""
    vocabulary: frozenset[str] | None = None
    """The words of a word-level tokenizer (the built-in one): a prompt word outside them is refused, where the
    tokenizer would silently make it ``<unk>``. None: any text is accepted (subword tokenizers spell every word)."""

    def __post_init__(self) -> None:
        if self.context is not None and self.max_new_tokens >= self.context:
            raise ValueError(
                f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{self.context:,} tokens ({self.source})"
            )

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str | None:
        try:
            text = prompt_texts([prompt], self.tokenizer)[0]
        except ValueError as exc:  # chat messages without a chat template
            return str(exc)
        except Exception as exc:  # the template itself failed on these messages
            return f"the chat template fails on this prompt ({type(exc).__name__}: {exc})"
        unknown = sorted(set(text.split()) - self.vocabulary) if self.vocabulary is not None else []
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            return (
                f"words outside the built-in tokenizer's vocabulary: {shown} (it knows {' '.join(BUILT_IN_WORDS)} "
                "only, space-separated); give --model a model directory with its own tokenizer"
            )
        room = None if self.context is None else self.context - self.max_new_tokens
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        cap = None if room is None else CHARS_PER_TOKEN * room
        partial = cap is not None and len(text) > cap
        ids = self.tokenizer(text[:cap] if partial else text, add_special_tokens=not chat)["input_ids"]
        if partial and room is not None and len(ids) <= room:  # over 64 characters a token: the whole prompt decides
            partial, ids = False, self.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        if not ids:
            return "the prompt has no tokens (empty after tokenization)"
        if room is None or len(ids) <= room:
            return None
        size = f"at least {len(ids):,} tokens (in its first {cap:,} characters)" if partial else f"{len(ids):,} tokens"
        return (
            f"the prompt is {size}, more than the model's context leaves for it: {self.context:,} tokens "
            f"({self.source}) minus --max-new-tokens {self.max_new_tokens} is {room:,}; shorten the prompt or lower "
            "--max-new-tokens"
        )


def prompt_check(weights_dir: Path | None, config: TrainConfig, tokenizer: Any = None) -> PromptCheck:
    """The :class:`PromptCheck` of a run's policy: the tokenizer (``tokenizer`` when already loaded) and context of
    ``weights_dir`` (a model or checkpoint directory), or of the built-in tiny model when None (its tokenizer,
    ``--tiny-max-positions``)."""
    built_in = frozenset(VOCAB)
    if weights_dir is None:
        positions = config.warm_start.model.max_positions
        return PromptCheck(build_tokenizer(), positions, config.max_new_tokens, "--tiny-max-positions", built_in)
    source = f"max_position_embeddings in {weights_dir / 'config.json'}"
    tokenizer = load_tokenizer(weights_dir) if tokenizer is None else tokenizer
    words = built_in if set(tokenizer.get_vocab()) == built_in else None  # a checkpoint of the built-in model
    return PromptCheck(tokenizer, context_length(weights_dir), config.max_new_tokens, source, words)


BUILT_IN_WORDS = ("0-9", "+", "-", "=", ".")
"""The built-in tokenizer's words as a message lists them (:data:`drgrpo.train.loop.tiny.VOCAB` less its specials)."""


def check_answers(config: TrainConfig, train: list[Example], held_out: list[Example]) -> None:
    """Without --reward, the default reward (exact match) reads each example's ``answer``: a dataset lacking it
    is refused now, naming the file and the first example without it, not after the first rollout."""
    if config.rewards:
        return
    files = (("--dataset", config.dataset, train), ("--eval-dataset", config.eval_dataset, held_out))
    for flag, path, examples in files:
        if path is None:
            continue
        missing = next((i for i, ex in enumerate(examples) if "answer" not in ex), None)
        if missing is not None:
            raise ValueError(
                f"{flag} {str(path)!r}: example #{missing} has no 'answer' field, which the default reward "
                "(drgrpo.train.loop.task:exact_match) reads; add it to every line or give --reward MODULE:FUNCTION"
            )
