"""``drgrpo.train``: the end-to-end Dr. GRPO trainer (``drgrpo train``) and its parts.

Import cost: this package needs the ``train`` extra (transformers, tokenizers, safetensors).
"""

from drgrpo.train.cli.plots import plot_run
from drgrpo.train.loop.data import RewardError, Rewards, load_jsonl, load_reward
from drgrpo.train.loop.evaluation import evaluate, evaluate_model
from drgrpo.train.loop.task import TaskConfig, exact_match, make_splits
from drgrpo.train.loop.tiny import TinyModelConfig, build_model, build_tokenizer
from drgrpo.train.loop.trainer import TrainResult, train
from drgrpo.train.loop.warmstart import warm_start
from drgrpo.train.train_config import EvalConfig, TrainConfig, WarmStartConfig

__all__ = [
    "EvalConfig",
    "RewardError",
    "Rewards",
    "TaskConfig",
    "TinyModelConfig",
    "TrainConfig",
    "TrainResult",
    "WarmStartConfig",
    "build_model",
    "build_tokenizer",
    "evaluate",
    "evaluate_model",
    "exact_match",
    "load_jsonl",
    "load_reward",
    "make_splits",
    "plot_run",
    "train",
    "warm_start",
]
