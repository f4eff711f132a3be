"""``drgrpo.train``: the end-to-end Dr. GRPO trainer (``drgrpo train``) and its parts.

Import cost: this package needs the ``train`` extra (transformers, tokenizers, safetensors).
"""

from drgrpo.train.config import EvalConfig, TrainConfig, WarmStartConfig
from drgrpo.train.data import RewardError, Rewards, load_jsonl, load_reward
from drgrpo.train.evaluation import evaluate, evaluate_model
from drgrpo.train.plots import plot_run
from drgrpo.train.task import TaskConfig, exact_match, make_splits
from drgrpo.train.tiny import TinyModelConfig, build_model, build_tokenizer
from drgrpo.train.trainer import TrainResult, train
from drgrpo.train.warmstart import warm_start

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
