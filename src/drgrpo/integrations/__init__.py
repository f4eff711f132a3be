"""drgrpo inside the engines people scale with: thin adapters, the math stays in the core.

Each adapter lives in its own module and needs its host's extra; ``import drgrpo`` imports none of them:

- :mod:`drgrpo.integrations.trl`: ``DrGRPOTrainer``, a TRL ``GRPOTrainer`` whose loss is drgrpo's
  (from a clone: ``pip install -e '.[trl]'``).
- :mod:`drgrpo.integrations.verl`: every preset as a verl policy-loss mode ``drgrpo.<preset>``
  (from a clone: ``pip install -e '.[verl]'``, in verl's own environment).
"""
