"""The RL loop: task, model, rollout, rewards, advantages, policy update, metrics, evaluation.

:func:`drgrpo.train.loop.trainer.train` runs it top to bottom. It may import :mod:`drgrpo.train.run`,
:mod:`drgrpo.train.train_config` and the core, never :mod:`drgrpo.train.cli` (docs/design.md, section 10).
"""
