"""A verl launch script's overrides composed against verl's own config, inside ``.venv-verl`` (verl 0.9.1).

Run by ``tests/integrations/test_recipes.py`` as ``.venv-verl/bin/python tests/verl_live/compose_recipe.py ARGS OUT``:
``ARGS`` holds the arguments the script passed to ``python3 -m verl.trainer.main_ppo`` (one per line). This composes
them with hydra onto ``verl/trainer/config/ppo_trainer.yaml`` (an unknown key or a bad value fails here), runs
verl's ``validate_config`` (batch sizes against the GPU count), builds the actor's dataclass, resolves the policy
loss through verl's registry (``import verl`` loads drgrpo's plug-in) and calls it once on a small on-policy
batch. It writes what it found as JSON to ``OUT``; nothing here asserts.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import verl  # its plug-in loader registers drgrpo's loss modes
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass, validate_config

LENGTHS = (3, 1, 2, 4)
ADVANTAGES = (1.0, -1.0, 0.5, -0.5)


def main(args_file: str, out_file: str) -> None:
    with open(args_file) as f:
        argv = [line for line in f.read().splitlines() if line]
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"], argv[:2]
    overrides = argv[2:]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    loss_fn = get_policy_loss_fn(actor.policy_loss.loss_mode)

    # one call on-policy (ratio 1): per-token loss -A, so the loss is -sum_i A_i |o_i| / (N_seq L) on one rank
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).to(torch.float64)
    logp = -torch.rand(len(LENGTHS), max(LENGTHS), dtype=torch.float64)
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)[:, None].expand_as(mask)
    actor.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=len(LENGTHS))
    loss, _ = loss_fn(logp, logp, advantages, mask, actor.loss_agg_mode, config=actor)

    rollout, data, algorithm = cfg.actor_rollout_ref.rollout, cfg.data, cfg.algorithm
    report = {
        "loss_fn": getattr(loss_fn, "drgrpo_preset", loss_fn.__name__),
        "loss": float(loss),
        "lengths": LENGTHS,
        "advantages": ADVANTAGES,
        "actor": {
            "loss_mode": actor.policy_loss.loss_mode,
            "loss_agg_mode": actor.loss_agg_mode,
            "loss_scale_factor": actor.loss_scale_factor,
            "clip_ratio_low": actor.clip_ratio_low,
            "clip_ratio_high": actor.clip_ratio_high,
            "clip_ratio_c": actor.clip_ratio_c,
            "use_kl_loss": actor.use_kl_loss,
            "ppo_mini_batch_size": cfg.actor_rollout_ref.actor.ppo_mini_batch_size,
            "ppo_epochs": actor.ppo_epochs,
            "lr": actor.optim.lr,
            "betas": list(actor.optim.betas),
            "weight_decay": actor.optim.weight_decay,
            "clip_grad": actor.optim.clip_grad,
            "lr_scheduler_type": actor.optim.lr_scheduler_type,
        },
        "algorithm": {"adv_estimator": algorithm.adv_estimator, "norm_adv_by_std": algorithm.norm_adv_by_std_in_grpo},
        "rollout": {"n": rollout.n, "temperature": rollout.temperature, "top_p": rollout.top_p, "name": rollout.name},
        "data": {
            "train_batch_size": data.train_batch_size,
            "max_response_length": data.max_response_length,
            "max_prompt_length": data.max_prompt_length,
            "train_files": str(data.train_files),
        },
        "model": str(cfg.actor_rollout_ref.model.path),
        "gpus": cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes,
    }
    with open(out_file, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
