"""The ``drgrpo`` command line: its commands (:mod:`~drgrpo.train.cli.main`), ``compare``, plots, progress output.

It may import :mod:`drgrpo.train.loop`, :mod:`drgrpo.train.run`, :mod:`drgrpo.train.train_config` and the core
(docs/design.md, section 10).
"""
