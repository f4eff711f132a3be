"""Configuration of a training run (and of ``drgrpo eval``): small frozen dataclasses, one docstring per field.

The CLI (:mod:`drgrpo.train.cli.main`) exposes every field as a kebab-case flag whose help text is the
field's docstring (:mod:`drgrpo.train.flags`), so ``drgrpo train --help`` and this file never
disagree: the docstrings are written as that help, for people. A run writes its resolved
configuration to ``OUTPUT_DIR/config.yaml``, keyed by those flags: ``drgrpo train --config
OUTPUT_DIR/config.yaml`` reruns it.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from drgrpo.advantages import OUTCOME_ESTIMATORS
from drgrpo.config import LossConfig, preset_names
from drgrpo.field_error import FieldError, check_finite_fields
from drgrpo.train.flags import add_flags, config_flags

ADAM_BETAS = (0.9, 0.99)
"""AdamW's (beta1, beta2), in the RL steps and in the warm start."""
LARGEST_WEIGHT = float(torch.finfo(torch.float32).max)
"""The largest number float32 and bfloat16 weights hold (3.4e38)."""
LR_LIMIT = LARGEST_WEIGHT * (1 - ADAM_BETAS[0])
"""The largest learning rate: torch's AdamW applies its first step size, lr / (1 - beta1) = 10 lr, as a number of
the weights' dtype (and stops with a traceback, mid-step, when it is larger)."""


# --------------------------------------------------------------------------- the parts of a run's configuration


def check_reward_fields(rewards: Any, weights: Any) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``(rewards, weights)`` of a configuration as tuples, or a TypeError naming the field and what it got.

    Rewards are imported by name, ``'module:function'`` (so that ``config.yaml`` reruns the run), and weights
    are numbers; lists are accepted and made tuples.
    """
    if isinstance(rewards, str) or not isinstance(rewards, (tuple, list)):
        raise TypeError(f"rewards must be a list of 'module:function' names, got {type(rewards).__name__}")
    for k, spec in enumerate(rewards):
        if not isinstance(spec, str):
            what = getattr(spec, "__qualname__", None) or type(spec).__name__
            raise TypeError(
                f"rewards[{k}] must be a 'module:function' name, got {type(spec).__name__} {what!r}: a run imports "
                "its rewards by name, so that its config.yaml reruns it; give e.g. 'mymodule:my_reward'"
            )
    if isinstance(weights, str) or not isinstance(weights, (tuple, list)):
        raise TypeError(f"reward_weights must be a list of numbers, got {type(weights).__name__}")
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"reward_weights[{k}] must be a number, got {type(w).__name__} {reprlib.repr(w)}")
    return tuple(rewards), tuple(float(w) for w in weights)


MAX_OPERAND = 999
"""The largest ``max_operand``: :func:`make_splits` lists every operand pair, 10^6 of them at 999 and a hundred
times as many at 9999 (tens of gigabytes)."""


@dataclass(frozen=True)
class TaskConfig:
    """The built-in addition task."""

    max_operand: int = 49
    """Operands are drawn from 0 to this number, inclusive (at most 999)."""
    max_work: int = 4
    """The warm-start data put 0 to this many working tokens in each completion (uniformly)."""
    work_position: Literal["after", "before"] = "after"
    """Where the working tokens go: after the answer (pure length) or before it (also room to compute)."""
    answer_noise: float = 0.0
    """Share of warm-start completions whose last answer digit is wrong (0: none; see ``noise_kind``). The
    length-bias variant: warm-started to high greedy accuracy (e.g. --warm-start-target-accuracy 0.9), the
    model answers right at greedy decoding but samples a wrong last digit about this often."""
    noise_kind: Literal["digit", "symbol"] = "digit"
    """What replaces the last digit under ``answer_noise``: digit, a random other digit (a mistake the model can
    only see by redoing the sum), or symbol, the token "-" (a mistake visible in the prefix as a token)."""
    num_eval: int = 200
    """Size of the held-out split (operand pairs never seen in training)."""
    seed: int = 1234
    """Seed of the train/held-out split (independent of the training seed)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_operand <= MAX_OPERAND:
            raise FieldError(
                TaskConfig,
                "max_operand",
                f"max_operand must be in 1..{MAX_OPERAND}, got {self.max_operand}: the task holds every operand "
                f"pair in memory, (max_operand + 1)^2 of them ({(MAX_OPERAND + 1) ** 2:,} at {MAX_OPERAND})",
            )
        if self.work_position not in ("before", "after"):
            raise FieldError(
                TaskConfig, "work_position", f"work_position must be 'before' or 'after', got {self.work_position!r}"
            )
        if self.max_work < 0:
            raise FieldError(TaskConfig, "max_work", f"max_work must be >= 0, got {self.max_work}")
        if self.noise_kind not in ("digit", "symbol"):
            raise FieldError(
                TaskConfig, "noise_kind", f"noise_kind must be 'digit' or 'symbol', got {self.noise_kind!r}"
            )
        # the right answer must stay the most likely one: against 9 wrong digits sharing the noise, or one symbol
        limit = 0.9 if self.noise_kind == "digit" else 0.5
        if not 0.0 <= self.answer_noise < limit:
            raise FieldError(
                TaskConfig,
                ("answer_noise", "noise_kind"),
                f"answer_noise must be in [0, {limit}) for noise_kind {self.noise_kind!r} (the right answer "
                f"must stay the most likely one), got {self.answer_noise}",
            )
        pairs = (self.max_operand + 1) ** 2
        if not 0 < self.num_eval < pairs:
            raise FieldError(
                TaskConfig,
                ("num_eval", "max_operand"),
                f"num_eval must be in 1..{pairs - 1} (max_operand {self.max_operand} gives {pairs} operand pairs), "
                f"got {self.num_eval}",
            )

    @property
    def width(self) -> int:
        """Digits per operand in a prompt (operands are zero-padded to this width)."""
        return len(str(self.max_operand))

    @property
    def max_answer_tokens(self) -> int:
        """Digits of the largest answer."""
        return len(str(2 * self.max_operand))


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the built-in Llama-style model."""

    hidden_size: int = 64
    """Width H of the residual stream."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block (each of width H / heads)."""
    intermediate_size: int = 256
    """Width of the SwiGLU MLP."""
    max_positions: int = 64
    """Longest sequence the model accepts, prompt and completion together, in tokens."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(TinyModelConfig, name, f"{name} must be a positive integer, got {value!r}")
        # each head takes H / heads dimensions, and rotary position embeddings turn them in pairs
        if self.hidden_size % 2:
            raise FieldError(
                TinyModelConfig,
                "hidden_size",
                f"hidden_size must be even (a head's width must be, for its rotary position embeddings), got "
                f"{self.hidden_size}",
            )
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            counts = [str(n) for n in range(1, self.hidden_size) if self.hidden_size % (2 * n) == 0]
            raise FieldError(
                TinyModelConfig,
                ("num_heads", "hidden_size"),
                f"num_heads {self.num_heads} does not split hidden_size {self.hidden_size} into heads of an even "
                f"width (rotary position embeddings turn a head's dimensions in pairs); num_heads can be "
                f"{', '.join(counts[:-1]) + ' or ' if len(counts) > 1 else ''}{counts[-1]}",
            )


# --------------------------------------------------------------------------- TrainConfig


def check_lr(owner: type, name: str, lr: float, weight_decay: float = 0.0) -> None:
    """Refuse a learning rate whose AdamW step the weights' dtype cannot hold: lr above :data:`LR_LIMIT`, or a
    decay factor ``1 - lr * weight_decay`` beyond :data:`LARGEST_WEIGHT`."""
    if lr > LR_LIMIT:
        raise FieldError(
            owner,
            name,
            f"{name} must be at most {LR_LIMIT:.2g}, got {lr:g}: AdamW's first step size is {name} / (1 - beta1) "
            f"= 10 x {name}, a number it applies in the weights' dtype, which holds at most {LARGEST_WEIGHT:.2g} "
            "(float32, bfloat16)",
        )
    if lr * weight_decay > LARGEST_WEIGHT:
        raise FieldError(
            owner,
            (name, "weight_decay"),
            f"{name} x weight_decay is {lr * weight_decay:g}: AdamW multiplies the weights by 1 - {name} x "
            f"weight_decay, which float32 and bfloat16 hold only up to {LARGEST_WEIGHT:.2g}",
        )


@dataclass(frozen=True)
class WarmStartConfig:
    """The supervised warm start of the built-in model (only used when no model is given)."""

    steps: int = 400
    """At most this many supervised steps of the warm start, on the train split."""
    target_accuracy: float = 0.25
    """Stop the warm start once greedy accuracy on a probe of the train split reaches this (0: always run every
    step)."""
    check_every: int = 10
    """Measure the probe accuracy every this many warm-start steps."""
    probe_size: int = 200
    """Train-split prompts in the probe (at most a quarter of the split), kept out of the supervised data."""
    batch_size: int = 128
    """Examples per supervised step."""
    lr: float = 3e-3
    """AdamW learning rate of the warm start."""
    seed: int = 0
    """Seed of the model's initialisation and of the warm-start data order."""
    model: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"prefix": "tiny-"})
    """Shape of the built-in model."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        for name in ("steps", "check_every", "batch_size"):
            if getattr(self, name) < 1:
                raise FieldError(WarmStartConfig, name, f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.target_accuracy <= 1:
            raise FieldError(
                WarmStartConfig, "target_accuracy", f"target_accuracy must be in [0, 1], got {self.target_accuracy}"
            )
        if not self.lr > 0:
            raise FieldError(WarmStartConfig, "lr", f"lr must be > 0, got {self.lr}")
        check_lr(WarmStartConfig, "lr", self.lr)


OnResume = Literal["meaning", "checkpoint", "free"]
"""What ``drgrpo train --resume`` does with a TrainConfig field given a value other than the run's:

- ``"meaning"``: the field changes what the run computes (its data, rewards, loss, sampling, optimisation,
  seed, what its evaluations measure): refused when the run continues in its own directory, with the list of
  what differs; a branch (``--resume CHECKPOINT --output-dir NEW``) may change it, and records it.
- ``"checkpoint"``: the checkpoint settles it (the model, and how the built-in one was made): always refused.
- ``"free"``: how the run runs, not what it computes (length, cadence, devices, memory, logging, limits):
  accepted, recorded in the run's history and config.yaml.
"""

RESUME_HELP: dict[str, str] = {
    "meaning": "On --resume: changed only by a branch.",
    "checkpoint": "On --resume: set by the checkpoint, even for a branch.",
    "free": "On --resume: may be changed.",
}
"""Each resume class as ``drgrpo train --help`` says it, after the help of every flag of that class."""


def flag(
    default: Any = dataclasses.MISSING,
    *,
    on_resume: OnResume,
    factory: Callable[[], Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """A :class:`TrainConfig` field: its ``default`` (or a ``factory`` making it), its resume class
    (:data:`OnResume`) and the flag ``metadata`` of :mod:`drgrpo.train.flags` (``flag``, ``repeat``, ...).

    The field's docstring, right under it, is its help; with this call it is all a new flag needs.
    """
    if on_resume not in RESUME_HELP:
        raise ValueError(f"on_resume must be one of {', '.join(RESUME_HELP)}, got {on_resume!r}")
    meta = {**(metadata or {}), "on_resume": on_resume}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """One Dr. GRPO (or GRPO-family) training run: a rollout, reward, advantage, loss, step loop.

    Its checks name fields as Python does (``eval_size must be >= 0``); ``drgrpo train`` prints the same
    messages with its flags (``--eval-size must be >= 0``), see :class:`drgrpo.field_error.FieldError`.
    """

    output_dir: str = flag("runs/default", on_resume="free")
    """Directory of the run: config.yaml, metrics.jsonl, checkpoints/, plots/ and the cached warm start."""
    model: str | None = flag(None, on_resume="checkpoint")
    """Initial policy: a local Hugging Face model directory (config, weights and tokenizer), a drgrpo run
    directory, its checkpoints/latest or one checkpoint. Not set: a tiny model built here and warm-started on
    the built-in task."""
    dataset: str | None = flag(None, on_resume="meaning")
    """Training prompts: a JSONL file, one JSON object per line with the prompt under ``prompt_field``. Not set:
    the built-in addition task."""
    eval_dataset: str | None = flag(None, on_resume="meaning")
    """Held-out prompts for evaluation, a JSONL file like ``dataset``. Not set: the built-in task's held-out split
    (no evaluation when ``dataset`` is set)."""
    prompt_field: str = flag("prompt", on_resume="meaning")
    """Key of a dataset line that holds the prompt: a string, or a list of chat messages."""
    rewards: tuple[str, ...] = flag((), on_resume="meaning", metadata={"flag": "reward", "repeat": True})
    """A reward function, module:function, called as function(completion, example) and returning a float; give
    the flag once per reward. The first reward decides correctness (the accuracy metrics). Not set: exact match
    on the built-in task."""
    reward_weights: tuple[float, ...] = flag((), on_resume="meaning")
    """Weight of each reward in the total, one per reward in the order given. Not set: 1 for each."""
    loss: str = flag("dr_grpo", on_resume="meaning")
    """The loss: a preset such as dr_grpo, grpo, dapo, gspo, cispo or sapo, or a peer framework's (trl.grpo,
    verl.grpo, oat.drgrpo, ...); single settings of it can be changed one by one."""
    loss_overrides: tuple[tuple[str, Any], ...] = flag((), on_resume="meaning", metadata={"flag": None, "via": "loss"})
    """(field, value) overrides of the preset's LossConfig, one per loss flag given. Its L, max_completion_length,
    is max_new_tokens: an override of it must agree."""
    advantage: Literal["grpo", "rloo", "reinforce_plus_plus_baseline", "opo", "grpo_passk", "gpg"] = flag(
        "grpo", on_resume="meaning"
    )
    """Advantage estimator, from each prompt's rewards (verl's estimators of the same names): grpo, the loss
    preset's (r minus its prompt's mean, divided by the std where the preset divides); rloo, r minus the mean of
    the prompt's other completions; opo, r minus the length-weighted mean; reinforce_plus_plus_baseline, r minus
    the mean, whitened over the batch's tokens; grpo_passk, only each prompt's best completion, best minus second
    best (divided by the std where the preset divides; needs --group-size 2 or more); gpg, r minus the mean,
    scaled by the batch size over its nonzero rewards."""
    steps: int = flag(300, on_resume="free")
    """RL steps: one rollout batch each, followed by ``ppo_epochs`` optimizer steps."""
    prompts_per_step: int = flag(64, on_resume="meaning")
    """Prompts per rollout batch, all processes together; must be divisible by the number of processes."""
    group_size: int = flag(8, on_resume="meaning")
    """Completions sampled per prompt (G)."""
    max_new_tokens: int = flag(8, on_resume="meaning")
    """Generation budget: at most this many tokens per completion. Also Dr. GRPO's constant L: the loss divides
    each completion's summed token losses by it."""
    temperature: float = flag(1.0, on_resume="meaning")
    """Sampling temperature of rollouts; log-probs are computed at the same temperature."""
    top_p: float = flag(1.0, on_resume="meaning")
    """Nucleus sampling threshold of rollouts (1: off)."""
    ppo_epochs: int = flag(1, on_resume="meaning")
    """Optimizer steps per rollout batch, each over the whole batch (above 1 the clipped ratio matters)."""
    micro_batch_size: int = flag(128, on_resume="free")
    """Completions per forward and backward pass; gradients add up over the micro-batches of a step, normalised
    once for the whole step."""
    lr: float = flag(5e-4, on_resume="meaning")
    """AdamW learning rate, constant after the warmup."""
    warmup_steps: int = flag(0, on_resume="meaning")
    """Optimizer steps of linear learning-rate warmup."""
    weight_decay: float = flag(0.0, on_resume="meaning")
    """AdamW weight decay."""
    grad_clip: float = flag(1.0, on_resume="meaning")
    """Clip the global gradient norm to this (0 turns clipping off; the norm is logged either way)."""
    fused: bool = flag(False, on_resume="free")
    """Compute log-probs from the hidden states in chunks (drgrpo.fused) instead of from the full logits: less
    memory for a large vocabulary."""
    seed: int = flag(0, on_resume="meaning")
    """Seed of the prompt order and of sampling. Each step reseeds from (seed, step, process), so a resumed run
    ends exactly where an uninterrupted one does."""
    device: str = flag("cpu", on_resume="free")
    """Torch device: cpu, cuda or cuda:N (several processes on CUDA take one GPU each, by LOCAL_RANK)."""
    threads: int = flag(0, on_resume="free")
    """CPU threads torch uses; 0: one for the built-in model (its operations are too small to split, and spare
    cores keep it fast on a busy machine), torch's own choice with ``model``."""
    dtype: Literal["float32", "bfloat16", "float16"] = flag("float32", on_resume="meaning")
    """Data type of the parameters: float32 or bfloat16 (float16 cannot train: it needs float32 master weights
    and loss scaling, which drgrpo does not do; drgrpo eval takes it)."""
    eval_every: int = flag(25, on_resume="free")
    """Evaluate on the held-out prompts every this many steps, and at step 0 and at the end (0: never)."""
    eval_size: int = flag(200, on_resume="meaning")
    """Held-out prompts per evaluation (the first ones of the held-out set); at least 1 while evaluation is on
    (``eval_every`` 0 turns it off)."""
    eval_temperature: float = flag(0.0, on_resume="meaning")
    """Sampling temperature of evaluation (0: greedy)."""
    eval_sampled: bool = flag(True, on_resume="meaning")
    """Also evaluate by sampling at the rollout temperature (logged next to the greedy evaluation)."""
    checkpoint_every: int = flag(50, on_resume="free")
    """Save a checkpoint every this many steps; also at the end and when stopped by SIGINT or SIGTERM (0: only
    then)."""
    keep_checkpoints: int = flag(0, on_resume="free")
    """Keep only the newest this many checkpoints, removing older ones once a new one is written (0: keep all, the
    default: a run's checkpoints are its history, and a full disk stops the run with a clear message instead)."""
    resume: str | None = flag(None, on_resume="free")
    """Continue an earlier run exactly: its output directory, its checkpoints/latest or one checkpoint. A checkpoint
    older than the run's newest continues only as a branch into a new --output-dir (the old run stays as it was).
    Not set: a new run."""
    ref_kl: bool = flag(True, on_resume="free")
    """Keep a frozen copy of the initial model to log the policy's KL to it, even without a KL penalty."""
    reward_timeout: float = flag(0.0, on_resume="free")
    """Seconds a single reward call may take: a call that takes longer is abandoned and fails the step, after the
    last completed step is saved (exit code 1). 0: no limit."""
    progress: bool = flag(True, on_resume="free")
    """Show a progress bar (on the first process only)."""
    tensorboard: bool = flag(False, on_resume="free")
    """Also write TensorBoard events to OUTPUT_DIR/tensorboard (needs the tensorboard package)."""
    deterministic: bool = flag(True, on_resume="free")
    """Use deterministic torch algorithms: CPU runs repeat bit for bit and resume exactly."""
    task: TaskConfig = flag(factory=TaskConfig, on_resume="meaning")  # noqa: RUF009 (a field, as field() is)
    """The built-in addition task (used when no dataset is given)."""
    warm_start: WarmStartConfig = flag(factory=WarmStartConfig, on_resume="checkpoint")  # noqa: RUF009
    """The supervised warm start of the built-in model (used when no model is given)."""

    def __post_init__(self) -> None:
        rewards, weights = check_reward_fields(self.rewards, self.reward_weights)  # names and numbers, as tuples
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "reward_weights", weights)
        check_finite_fields(self)  # --lr nan, --reward-weights inf, ...: refused like any bad value
        if not self.output_dir.strip():  # "" would write the run into the current directory
            raise FieldError(TrainConfig, "output_dir", f"output_dir must name a directory, got {self.output_dir!r}")
        positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "micro_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(TrainConfig, name, f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "eval_size", "threads"):
            if getattr(self, name) < 0:
                raise FieldError(TrainConfig, name, f"{name} must be >= 0, got {getattr(self, name)!r}")
        keep = self.keep_checkpoints
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise FieldError(
                TrainConfig, "keep_checkpoints", f"keep_checkpoints must be >= 0 (0: keep all), got {keep!r}"
            )
        timeout = self.reward_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:  # NaN, inf: above
            raise FieldError(
                TrainConfig,
                "reward_timeout",
                f"reward_timeout must be a number of seconds >= 0 (0: no limit), got {timeout!r}",
            )
        for name in ("lr", "weight_decay", "eval_temperature"):
            if getattr(self, name) < 0:
                raise FieldError(TrainConfig, name, f"{name} must be >= 0, got {getattr(self, name)}")
        check_lr(TrainConfig, "lr", self.lr, self.weight_decay)
        if self.grad_clip < 0:
            raise FieldError(
                TrainConfig, "grad_clip", f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}"
            )
        if self.advantage not in OUTCOME_ESTIMATORS:
            choices = ", ".join(OUTCOME_ESTIMATORS)
            raise FieldError(TrainConfig, "advantage", f"advantage must be one of {choices}, got {self.advantage!r}")
        if self.advantage == "grpo_passk" and self.group_size < 2:
            raise FieldError(
                TrainConfig,
                ("advantage", "group_size"),
                f"advantage grpo_passk compares each prompt's best two completions: group_size must be >= 2, "
                f"got {self.group_size}",
            )
        if not self.temperature > 0:
            raise FieldError(
                TrainConfig, "temperature", f"temperature must be > 0 (log-probs divide by it), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise FieldError(TrainConfig, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise FieldError(TrainConfig, "dtype", f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.eval_size == 0 and self.eval_every:
            raise FieldError(
                TrainConfig,
                ("eval_size", "eval_every"),
                f"eval_size 0 with eval_every {self.eval_every} would evaluate no prompt; "
                "to turn evaluation off, set eval_every 0",
            )
        if self.reward_weights and len(self.reward_weights) != max(len(self.rewards), 1):
            raise FieldError(
                TrainConfig,
                "reward_weights",
                f"reward_weights has {len(self.reward_weights)} weight(s) for {max(len(self.rewards), 1)} reward(s); "
                "give one weight per reward",
            )
        if self.loss not in preset_names():
            raise FieldError(
                TrainConfig, "loss", f"loss: unknown preset {self.loss!r}; valid presets: {', '.join(preset_names())}"
            )
        length = dict(self.loss_overrides).get("max_completion_length", self.max_new_tokens)
        if length != self.max_new_tokens:
            raise FieldError(
                TrainConfig,
                "max_new_tokens",
                f"max_completion_length {length} (a loss override) disagrees with max_new_tokens "
                f"{self.max_new_tokens}: Dr. GRPO's constant L is the generation budget, so the loss takes it "
                "from max_new_tokens",
            )

    def check_trainable(self) -> None:
        """Refuse what this configuration can describe but not train (``drgrpo eval`` may still use it).

        ``--dtype float16``: AdamW on float16 weights breaks at the first step (its eps 1e-8 rounds to 0 in
        float16, so a parameter with a zero second moment gets an infinite update); float16 training needs
        float32 master weights and loss scaling, which drgrpo does not do. bfloat16 has float32's range.
        """
        if self.dtype == "float16":
            raise FieldError(
                TrainConfig,
                "dtype",
                "dtype float16 cannot train: AdamW on float16 weights turns them non-finite (its eps 1e-8 is 0 "
                "in float16) and float16 training needs float32 master weights and loss scaling, which drgrpo "
                "does not do; use dtype bfloat16 (same memory, float32's range) or float32",
            )

    def loss_config(self) -> LossConfig:
        """The resolved :class:`LossConfig`: the preset with the overrides, and L = ``max_new_tokens``."""
        overrides = {**dict(self.loss_overrides), "max_completion_length": self.max_new_tokens}
        return LossConfig.preset(self.loss, **overrides)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def eval_due(self, step: int) -> bool:
        """Whether step ``step`` ends with a held-out evaluation (every ``eval_every`` steps, and the last)."""
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.steps)

    def checkpoint_due(self, step: int) -> bool:
        """Whether step ``step`` ends with a checkpoint (every ``checkpoint_every`` steps, and the last)."""
        return step == self.steps or bool(self.checkpoint_every and step % self.checkpoint_every == 0)

    def check_world_size(self, world: int) -> None:
        """Raise unless the step's prompts split evenly over ``world`` processes (whole groups on each)."""
        if self.prompts_per_step % world:
            raise FieldError(
                TrainConfig,
                "prompts_per_step",
                f"prompts_per_step ({self.prompts_per_step}) must be divisible by the number of processes ({world})",
            )

    def apply_torch_settings(self) -> None:
        """Deterministic algorithms (bitwise-reproducible CPU runs) and the CPU thread count."""
        if self.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.threads or self.model is None:  # the built-in tiny model: 1 thread (its ops are too small to split)
            torch.set_num_threads(self.threads or 1)

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW over ``params`` with this run's learning rate and weight decay (betas 0.9, 0.99)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=ADAM_BETAS, weight_decay=self.weight_decay)

    # ---------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["task"] = TaskConfig(**d.get("task", {}))
        ws = dict(d.get("warm_start", {}))
        ws["model"] = TinyModelConfig(**ws.get("model", {}))
        d["warm_start"] = WarmStartConfig(**ws)
        d["rewards"] = tuple(d.get("rewards", ()))
        d["reward_weights"] = tuple(d.get("reward_weights", ()))
        d["loss_overrides"] = tuple((k, v) for k, v in d.get("loss_overrides", ()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_flags(self) -> dict[str, Any]:
        """``{flag name: value}`` of every flag of ``drgrpo train`` (the loss overrides as their LossConfig flags).

        Read back with ``drgrpo train --config FILE`` it gives this configuration again.
        """
        import argparse

        flags = add_flags(argparse.ArgumentParser(add_help=False), TrainConfig, "train")
        groups = {"train": self, "task": self.task, "warm_start": self.warm_start, "model": self.warm_start.model}
        values = config_flags(flags, groups)
        # L is --max-new-tokens (max_completion_length, when overridden at all, agrees with it)
        values.update(
            {name.replace("_", "-"): value for name, value in self.loss_overrides if name != "max_completion_length"}
        )
        return values


CONFIG_FILE = "config.yaml"
"""The resolved configuration a run writes into its output directory."""

RUN_PLACE = ("output_dir", "resume")
"""The fields that say where the run is and where it continues from, which a resume does not compare (a new
``output_dir`` on resume makes a branch); their help says so, without a resume class."""


def on_resume(name: str) -> OnResume:
    """The resume class of TrainConfig field ``name``, given by :func:`flag` (TypeError naming a field without
    one: every field is defined with :func:`flag`)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise ValueError(f"TrainConfig has no field {name!r}")
    kind = fields[name].metadata.get("on_resume")
    if kind not in RESUME_HELP:
        raise TypeError(
            f"TrainConfig field {name!r} has no resume class: define it as {name}: ... = flag(DEFAULT, "
            f"on_resume=...) with one of {', '.join(RESUME_HELP)}, got {kind!r}"
        )
    return kind  # type: ignore[no-any-return]


def resume_help(name: str) -> str | None:
    """What ``drgrpo train --help`` says of a new value of field ``name`` (and of its nested flags) on resume:
    :data:`RESUME_HELP` of its class; None for :data:`RUN_PLACE`, whose help says what a resume is."""
    return None if name in RUN_PLACE else RESUME_HELP[on_resume(name)]


@dataclass(frozen=True)
class EvalConfig:
    """``drgrpo eval``: a model's held-out accuracy and lengths. Unset fields come from the run that made it."""

    model: str | None = field(default=None, metadata={"required": True})
    """The model to evaluate: a drgrpo run directory (its latest checkpoint), its checkpoints/latest, one
    checkpoint, or a local Hugging Face model directory. Required, on the command line or in the --config file."""
    eval_dataset: str | None = None
    """Held-out prompts, a JSONL file (for a run on the built-in task: its held-out split)."""
    prompt_field: str | None = None
    """Key of a dataset line that holds the prompt."""
    rewards: tuple[str, ...] = field(default=(), metadata={"flag": "reward", "repeat": True})
    """A reward function, module:function (once per reward; the first decides correctness)."""
    max_new_tokens: int | None = None
    """Generation budget: at most this many tokens per completion."""
    eval_size: int | None = None
    """Held-out prompts to evaluate (the first ones)."""
    eval_temperature: float | None = None
    """Sampling temperature (0: greedy)."""
    top_p: float | None = None
    """Nucleus sampling threshold (1: off)."""
    device: str | None = None
    """Torch device: cpu, cuda or cuda:N."""
    dtype: str | None = None
    """Data type of the parameters: float32, bfloat16 or float16."""
    seed: int | None = None
    """Seed of sampled evaluation."""
    json: bool = False
    """Print one JSON object instead of a table."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if self.eval_size is not None and self.eval_size < 1:
            raise FieldError(EvalConfig, "eval_size", f"eval_size must be >= 1 (prompts), got {self.eval_size}")
        if self.eval_temperature is not None and self.eval_temperature < 0:
            raise FieldError(
                EvalConfig, "eval_temperature", f"eval_temperature must be >= 0, got {self.eval_temperature}"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FieldError(EvalConfig, "top_p", f"top_p must be in (0, 1], got {self.top_p}")

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """``base`` (the evaluated run's configuration) with the fields set here."""
        if self.model is None:
            raise ValueError("drgrpo eval needs --model (a checkpoint, a run directory or a model directory)")
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("model", "json", "rewards") and getattr(self, f.name) is not None
        }
        if self.rewards:
            changes.update(rewards=self.rewards, reward_weights=())
        return base.replace(**changes)
