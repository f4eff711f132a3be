"""A documented verl command line, as far as it runs without a cluster: run in ``.venv-verl``.

    .venv-verl/bin/python tests/verl_live/launch_check.py OUT.json KEY=VALUE ...

verl's trainer (``python -m verl.trainer.main_ppo``) needs Ray, a model and GPUs. This script takes the command
line's Hydra overrides, composes them with verl's own trainer configuration (``ppo_trainer``; an unknown key or a
bad value fails here as it would there), builds verl's actor configuration from the result (the ``...`` of the
command line stands for the user's settings; verl needs a micro-batch size to build it, so ``FILL`` adds one), then
looks up the policy-loss mode it selects in verl's registry (``import verl`` loads drgrpo's plug-in) and calls it
on a small float64 batch with the global counts verl's actor passes. It writes the composed settings, the inputs
and verl's loss to OUT.json; ``tests/test_docs.py`` compares the loss with drgrpo's reference. Nothing asserts here.
"""

from __future__ import annotations

import json
import sys

import torch
import verl  # noqa: F401  (it loads the verl.plugins entry points, drgrpo's among them: nothing imports drgrpo first)
from hydra import compose, initialize_config_module
from verl.trainer.ppo import core_algos
from verl.utils.config import omega_conf_to_dataclass

FILL = ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",)
"""What the command line's ``...`` must hold at least for verl to build its actor configuration."""


def main(out: str, overrides: list[str]) -> None:
    with initialize_config_module("verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[*overrides, *FILL])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    mode = actor.policy_loss.loss_mode
    g = torch.Generator().manual_seed(0)
    rows, width = 6, 5
    mask = (torch.arange(width) < torch.tensor([[5], [2], [4], [1], [3], [5]])).to(torch.float64)
    logp = -torch.rand(rows, width, generator=g, dtype=torch.float64) - 0.1
    old = logp + 0.3 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.25, -0.25], dtype=torch.float64)
    actor.global_batch_info.update({"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": rows})
    fn = core_algos.get_policy_loss_fn(mode)
    loss, _ = fn(old, logp, adv.unsqueeze(-1) * mask, mask.bool(), actor.loss_agg_mode, actor)
    result = {
        "loss_mode": mode,
        "loss_scale_factor": actor.loss_scale_factor,
        "loss_agg_mode": actor.loss_agg_mode,
        "clip_ratio_low": actor.clip_ratio_low,
        "clip_ratio_high": actor.clip_ratio_high,
        "clip_ratio_c": actor.clip_ratio_c,
        "adv_estimator": cfg.algorithm.adv_estimator,
        "norm_adv_by_std_in_grpo": cfg.algorithm.norm_adv_by_std_in_grpo,
        "loss_function": f"{fn.__module__}.{fn.__qualname__}",
        "inputs": {"logp": logp.tolist(), "old": old.tolist(), "adv": adv.tolist(), "mask": mask.tolist()},
        "loss": float(loss),
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
