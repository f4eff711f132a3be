"""What several test modules share, so that no test module imports another (``tests/test_imports.py`` checks it).

``tests/`` is on the tests' import path (``pythonpath`` in pyproject.toml's ``[tool.pytest.ini_options]``), so a
test in any folder imports these as ``helpers.<module>``:

- ``cli_runs``: the tiny ``drgrpo train`` flags, runs in subprocesses, and the checks that a run ended exactly
  like the uninterrupted reference;
- ``tiny_configs``: the same tiny settings as a ``TrainConfig`` for the trainer called in-process;
- ``normalizer_steps``: one optimizer step's batch on a float64 output layer, split into micro-batches;
- ``fused_batches``: hidden states and an output layer for the fused loss, and its comparison with the logits path;
- ``trl_standin``: TRL's ``GRPOTrainer`` loss and advantage code run on a stand-in trainer;
- ``forked_drgrpo``: the docs' ``drgrpo`` commands forked from a process that imported drgrpo once;
- ``shared_dirs``: directories made once per session for every pytest-xdist worker (the default warm start).
"""
