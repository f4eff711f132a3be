"""The tiny settings as configuration objects, for the trainer called as a Python function."""

from __future__ import annotations

from pathlib import Path

from drgrpo.train import TaskConfig, TinyModelConfig, TrainConfig, WarmStartConfig

TINY_MODEL = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=32)


TINY_TASK = TaskConfig(max_operand=9, max_work=2, num_eval=20, seed=3)


TINY_WARM = WarmStartConfig(steps=20, batch_size=16, lr=1e-2, model=TINY_MODEL)


def tiny(out: Path, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(out),
        steps=6,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=5,
        micro_batch_size=8,
        lr=1e-2,
        eval_every=0,
        eval_size=8,
        checkpoint_every=0,
        progress=False,
        task=TINY_TASK,
        warm_start=TINY_WARM,
    )
    base.update(kw)
    return TrainConfig(**base)
