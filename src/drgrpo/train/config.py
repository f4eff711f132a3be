"""Configuration of a training run (and of ``drgrpo eval``): small frozen dataclasses, one docstring per field.

The CLI (:mod:`drgrpo.train.cli`) exposes every field as a kebab-case flag whose help text is the
field's docstring (:mod:`drgrpo.train.flags`), so ``drgrpo train --help`` and this file never
disagree. A run writes its resolved configuration to ``OUTPUT_DIR/config.yaml``, keyed by those
flags: ``drgrpo train --config OUTPUT_DIR/config.yaml`` reruns it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drgrpo.config import LossConfig
from drgrpo.train.flags import add_flags, check_finite_fields, config_flags
from drgrpo.train.task import TaskConfig
from drgrpo.train.tiny import TinyModelConfig


@dataclass(frozen=True)
class WarmStartConfig:
    """The supervised warm start of the built-in model (only used when no ``--model`` is given)."""

    steps: int = 400
    """At most this many supervised steps on the train split."""
    target_accuracy: float = 0.25
    """Stop as soon as greedy accuracy on a probe of the train split reaches this (0: always run all steps)."""
    check_every: int = 10
    """Measure the probe accuracy every this many steps."""
    probe_size: int = 200
    """Train-split prompts in the probe (at most a quarter of the split), kept out of the supervised data."""
    batch_size: int = 128
    """Examples per supervised step."""
    lr: float = 3e-3
    """AdamW learning rate of the warm start."""
    seed: int = 0
    """Seed of the model initialisation and the warm-start data order."""
    model: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"prefix": "tiny-"})
    """Shape of the built-in model."""

    def __post_init__(self) -> None:
        check_finite_fields(self, "warm-start-")
        for name in ("steps", "check_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--warm-start-{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"--warm-start-target-accuracy must be in [0, 1], got {self.target_accuracy}")
        if not self.lr > 0:
            raise ValueError(f"--warm-start-lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class TrainConfig:
    """One Dr. GRPO (or GRPO-family) training run: a rollout, reward, advantage, loss, step loop."""

    output_dir: str = "runs/default"
    """Directory for metrics.jsonl, checkpoints/, plots/ and the cached warm start."""
    model: str | None = None
    """Initial policy: a local Hugging Face model directory (config + weights + tokenizer), or a drgrpo run directory,
    its checkpoints/latest or a checkpoint; None builds and warm-starts the tiny model."""
    dataset: str | None = None
    """JSONL training prompts (one JSON object per line); None uses the built-in addition task."""
    eval_dataset: str | None = None
    """JSONL held-out prompts for evaluation; None: the built-in held-out split (no evaluation with --dataset)."""
    prompt_field: str = "prompt"
    """Field of a dataset line holding the prompt (a string, or a list of chat messages)."""
    rewards: tuple[str, ...] = field(default=(), metadata={"flag": "reward", "repeat": True})
    """Reward callable 'module:function' taking (completion, example) -> float; repeat the flag for several. The first
    is the correctness reward behind 'accuracy'. Empty: the built-in task's exact match."""
    reward_weights: tuple[float, ...] = ()
    """One weight per reward (default 1 each); the first reward is the correctness reward used for accuracy."""
    loss: str = "dr_grpo"
    """Loss preset name (dr_grpo, grpo, dapo, ...); LossConfig fields can be overridden with loss_overrides."""
    loss_overrides: tuple[tuple[str, Any], ...] = field(default=(), metadata={"flag": None, "via": "loss"})
    """(field, value) overrides applied to the preset, one flag per LossConfig field; max_completion_length
    defaults to max_new_tokens."""
    steps: int = 300
    """RL steps (one rollout batch each; ppo_epochs optimizer steps per rollout)."""
    prompts_per_step: int = 64
    """Prompts per rollout batch (all processes together); must be divisible by the number of processes."""
    group_size: int = 8
    """Completions sampled per prompt (G)."""
    max_new_tokens: int = 8
    """Generation budget per completion; also Dr. GRPO's constant L unless overridden."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs are computed at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of rollouts (1 disables it)."""
    ppo_epochs: int = 1
    """Optimizer steps per rollout batch, each over the whole batch (>1 makes the clipped ratio matter)."""
    micro_batch_size: int = 128
    """Completions per forward/backward; gradients accumulate over micro-batches with one exact step normaliser."""
    lr: float = 5e-4
    """AdamW learning rate (constant after warmup)."""
    warmup_steps: int = 0
    """Linear learning-rate warmup, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off; the norm is logged either way)."""
    fused: bool = False
    """Use drgrpo.fused.fused_policy_loss (chunked log-probs from the hidden states) instead of full logits."""
    seed: int = 0
    """Seed of prompt order and sampling (each step reseeds from (seed, step, rank): resume is exact)."""
    device: str = "cpu"
    """torch device, e.g. 'cpu', 'cuda', 'cuda:1' (DDP ranks use their LOCAL_RANK on CUDA)."""
    threads: int = 0
    """torch CPU threads (torch.set_num_threads); 0: 1 for the built-in tiny model (its ops are too small to
    split, and spare cores keep it fast on a busy machine), torch's default for --model."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16 (float16 cannot train: it needs float32 master weights and loss scaling,
    which drgrpo does not do; drgrpo eval takes it)."""
    eval_every: int = 25
    """Evaluate on the held-out split every this many steps (and at step 0 and at the end); 0 disables."""
    eval_size: int = 200
    """Held-out prompts per evaluation (the first ones of the split); at least 1 while evaluation is on (--eval-every
    0 turns it off)."""
    eval_temperature: float = 0.0
    """Sampling temperature of evaluation (0: greedy)."""
    eval_sampled: bool = True
    """Also evaluate at the rollout temperature (logged as eval_sampled/*)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and at the end and on SIGINT/SIGTERM); 0: only those."""
    resume: str | None = None
    """An earlier run to continue exactly: its output directory, its checkpoints/latest, or a checkpoint directory."""
    ref_kl: bool = True
    """Keep a frozen reference copy of the initial model to log KL(policy || reference) even when beta = 0."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    tensorboard: bool = False
    """Also write TensorBoard events to output_dir/tensorboard (needs the tensorboard package)."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms(True): bitwise-reproducible CPU runs and exact resume."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The built-in addition task (used when no dataset is given)."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """The supervised warm start of the built-in model (used when no model is given)."""

    def __post_init__(self) -> None:
        check_finite_fields(self)  # --lr nan, --reward-weights inf, ...: refused like any bad value
        positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "micro_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "eval_size", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "eval_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 (log-probs divide by it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.eval_size == 0 and self.eval_every:
            raise ValueError(
                f"--eval-size 0 with --eval-every {self.eval_every} would evaluate no prompt; "
                "to turn evaluation off, set --eval-every 0"
            )
        if self.reward_weights and len(self.reward_weights) != max(len(self.rewards), 1):
            raise ValueError(
                f"--reward-weights has {len(self.reward_weights)} weights for "
                f"{max(len(self.rewards), 1)} reward(s); give one weight per reward"
            )

    def check_trainable(self) -> None:
        """Refuse what this configuration can describe but not train (``drgrpo eval`` may still use it).

        ``--dtype float16``: AdamW on float16 weights breaks at the first step (its eps 1e-8 rounds to 0 in
        float16, so a parameter with a zero second moment gets an infinite update); float16 training needs
        float32 master weights and loss scaling, which drgrpo does not do. bfloat16 has float32's range.
        """
        if self.dtype == "float16":
            raise ValueError(
                "--dtype float16 cannot train: AdamW on float16 weights turns them non-finite (its eps 1e-8 is 0 "
                "in float16) and float16 training needs float32 master weights and loss scaling, which drgrpo "
                "does not do; use --dtype bfloat16 (same memory, float32's range) or float32"
            )

    def loss_config(self) -> LossConfig:
        """The resolved :class:`LossConfig`: the preset, L = max_new_tokens by default, then the overrides."""
        overrides = dict(self.loss_overrides)
        if "max_completion_length" not in overrides:
            overrides["max_completion_length"] = self.max_new_tokens
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
            raise ValueError(f"prompts_per_step={self.prompts_per_step} must be divisible by the {world} processes")

    def apply_torch_settings(self) -> None:
        """Deterministic algorithms (bitwise-reproducible CPU runs) and the CPU thread count."""
        if self.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.threads or self.model is None:  # the built-in tiny model: 1 thread (its ops are too small to split)
            torch.set_num_threads(self.threads or 1)

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW over ``params`` with this run's learning rate and weight decay (betas 0.9, 0.99)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.99), weight_decay=self.weight_decay)

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
        values.update({name.replace("_", "-"): value for name, value in self.loss_overrides})
        return values

    def write(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/config.yaml`` (creating ``out_dir``): every flag of this run, for ``--config``."""
        import yaml

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / CONFIG_FILE
        header = "# drgrpo train --config this-file reruns this run; keys are the flags of drgrpo train\n"
        path.write_text(header + yaml.safe_dump(self.to_flags(), sort_keys=False))
        return path


def _flag(name: str) -> str:
    return name.replace("_", "-")


CONFIG_FILE = "config.yaml"
"""The resolved configuration a run writes into its output directory."""


@dataclass(frozen=True)
class EvalConfig:
    """``drgrpo eval``: a model's held-out accuracy and lengths. Unset fields come from the run that made it."""

    model: str | None = None
    """The model to evaluate: a checkpoint, a run directory (its latest checkpoint), its checkpoints/latest, or a
    local Hugging Face model directory (required)."""
    eval_dataset: str | None = None
    """JSONL held-out prompts; None: the run's own held-out set (the built-in split for the default run)."""
    prompt_field: str | None = None
    """Field of a dataset line holding the prompt; None: the run's."""
    rewards: tuple[str, ...] = field(default=(), metadata={"flag": "reward", "repeat": True})
    """Reward callable 'module:function' (repeat for several; the first is the correctness reward); empty: the run's."""
    max_new_tokens: int | None = None
    """Generation budget per completion; None: the run's."""
    eval_size: int | None = None
    """Held-out prompts to evaluate (the first ones); None: the run's."""
    eval_temperature: float | None = None
    """Sampling temperature (0: greedy); None: the run's (greedy by default)."""
    top_p: float | None = None
    """Nucleus sampling threshold; None: the run's."""
    device: str | None = None
    """torch device; None: the run's."""
    dtype: str | None = None
    """Parameter dtype (float32, bfloat16, float16); None: the run's."""
    seed: int | None = None
    """Seed of sampled evaluation; None: the run's."""
    json: bool = False
    """Print one JSON object instead of a table."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"--eval-size must be >= 1 (prompts to evaluate), got {self.eval_size}")
        if self.eval_temperature is not None and self.eval_temperature < 0:
            raise ValueError(f"--eval-temperature must be >= 0 (0: greedy), got {self.eval_temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")

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
