"""The run's safety: checkpoints, resume, run identity, the directory lock, signals, disk and pre-flight checks,
process start-up.

It may import :mod:`drgrpo.train.train_config` and the core, never :mod:`drgrpo.train.loop` or
:mod:`drgrpo.train.cli` (docs/design.md, section 10).
"""
