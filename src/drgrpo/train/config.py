"""Configuration of a training run: small frozen dataclasses, one docstring per field.

The CLI (:mod:`drgrpo.train.cli`) exposes every field as a kebab-case flag whose help text is
the field's docstring, so ``drgrpo train --help`` and this file never disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from drgrpo.config import LossConfig
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
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the built-in model."""


@dataclass(frozen=True)
class TrainConfig:
    """One Dr. GRPO (or GRPO-family) training run: a rollout, reward, advantage, loss, step loop."""

    output_dir: str = "runs/default"
    """Directory for metrics.jsonl, checkpoints/, plots/ and the cached warm start."""
    model: str | None = None
    """Local Hugging Face model directory (config + weights + tokenizer); None builds and warm-starts the tiny model."""
    dataset: str | None = None
    """JSONL training prompts (one JSON object per line); None uses the built-in addition task."""
    eval_dataset: str | None = None
    """JSONL held-out prompts for evaluation; None: the built-in held-out split (no evaluation with --dataset)."""
    prompt_field: str = "prompt"
    """Field of a dataset line holding the prompt (a string, or a list of chat messages)."""
    rewards: tuple[str, ...] = ()
    """Reward callables 'module:function' taking (completion, example) -> float; empty: the built-in exact match."""
    reward_weights: tuple[float, ...] = ()
    """One weight per reward (default 1 each); the first reward is the correctness reward used for accuracy."""
    loss: str = "dr_grpo"
    """Loss preset name (dr_grpo, grpo, dapo, ...); LossConfig fields can be overridden with loss_overrides."""
    loss_overrides: tuple[tuple[str, Any], ...] = ()
    """(field, value) overrides applied to the preset; max_completion_length defaults to max_new_tokens."""
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
    """Clip the global gradient norm to this (0 disables clipping; the norm is logged either way)."""
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
    """Parameter dtype: float32, bfloat16 or float16."""
    eval_every: int = 25
    """Evaluate on the held-out split every this many steps (and at step 0 and at the end); 0 disables."""
    eval_size: int = 200
    """Held-out prompts per evaluation (the first eval_size of the split)."""
    eval_temperature: float = 0.0
    """Sampling temperature of evaluation (0: greedy)."""
    eval_sampled: bool = True
    """Also evaluate at the rollout temperature (logged as eval_sampled/*)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and at the end and on SIGINT/SIGTERM); 0: only those."""
    resume: str | None = None
    """Output directory (or checkpoint directory) of an earlier run to continue from exactly."""
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
        positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "micro_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "eval_size", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"TrainConfig.temperature must be > 0 (log-probs divide by it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"TrainConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.eval_temperature < 0:
            raise ValueError(f"TrainConfig.eval_temperature must be >= 0, got {self.eval_temperature}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"TrainConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.reward_weights and len(self.reward_weights) != max(len(self.rewards), 1):
            raise ValueError(
                f"TrainConfig.reward_weights has {len(self.reward_weights)} weights for "
                f"{max(len(self.rewards), 1)} reward(s); give one weight per reward"
            )

    def loss_config(self) -> LossConfig:
        """The resolved :class:`LossConfig`: the preset, L = max_new_tokens by default, then the overrides."""
        overrides = dict(self.loss_overrides)
        if "max_completion_length" not in overrides:
            overrides["max_completion_length"] = self.max_new_tokens
        return LossConfig.preset(self.loss, **overrides)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

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


def parse_value(text: str) -> Any:
    """A command-line override value: a Python literal (1, 0.2, None, True) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
