"""A verl launch script's overrides composed against verl's own config, inside ``.venv-verl`` (verl 0.9.1).

Run by ``tests/integrations/test_recipes.py`` as ``.venv-verl/bin/python tests/verl_live/compose_recipe.py ARGS OUT``:
``ARGS`` holds the arguments the script passed to ``python3 -m verl.trainer.main_ppo`` (one per line). This composes
them with hydra onto ``verl/trainer/config/ppo_trainer.yaml`` (an unknown key or a bad value fails here), runs
verl's ``validate_config`` (batch sizes against the GPU count), builds the actor's dataclass, resolves the policy
loss through verl's registry (``import verl`` loads drgrpo's plug-in) and calls it once on a small on-policy
batch. It resolves the reward manager and the reward function the way verl's trainer does and scores hand-made
completions with them (the model's tokenizer): complete or cut off at the budget ``data.max_response_length``,
right or wrong. It writes what it found as JSON to ``OUT``; nothing here asserts.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import verl  # its plug-in loader registers drgrpo's loss modes
from hydra import compose, initialize_config_dir
from verl import DataProto
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls
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
    rewards = score_hand_made(cfg)
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
        "evaluation": {
            "val_files": [str(f) for f in data.val_files],
            "do_sample": rollout.val_kwargs.do_sample,
            "temperature": rollout.val_kwargs.temperature,
            "n": rollout.val_kwargs.n,
            "test_freq": cfg.trainer.test_freq,
            "val_before_train": cfg.trainer.val_before_train,
        },
        "filter_overlong_prompts": data.filter_overlong_prompts,
        "rewards": rewards,
        "gpus": cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes,
    }
    with open(out_file, "w") as f:
        json.dump(report, f)


def score_hand_made(cfg) -> dict:
    """The configured reward manager's scores of hand-made completions, keyed by what each one is."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path)
    manager_cls = resolve_reward_manager_cls(cfg)
    manager = manager_cls(cfg, tokenizer, get_custom_reward_fn(cfg))
    budget = int(cfg.data.max_response_length)
    right = tokenizer.encode(" so \\boxed{42}", add_special_tokens=False)
    wrong = tokenizer.encode(" so \\boxed{41}", add_special_tokens=False)
    filler = tokenizer.encode(" think", add_special_tokens=False)[:1]  # one token, repeated to fill the budget
    eos = tokenizer.eos_token_id
    cases = {
        "right, ended": [*right, eos],
        "right, ended on the last slot": filler * (budget - len(right) - 1) + right + [eos],
        "right, cut off": filler * (budget - len(right)) + right,
        "wrong, cut off": filler * (budget - len(wrong)) + wrong,
        "right, one short of the budget": filler * (budget - len(right) - 1) + right,
    }
    scores = {}
    for name, ids in cases.items():
        assert len(ids) <= budget, (name, len(ids))
        responses = torch.full((1, budget), tokenizer.pad_token_id or 0, dtype=torch.long)
        responses[0, : len(ids)] = torch.tensor(ids)
        prompts = torch.tensor([tokenizer.encode("What is 6 x 7?", add_special_tokens=False)])
        mask = torch.cat([torch.ones_like(prompts), (torch.arange(budget) < len(ids)).long()[None]], dim=1)
        batch = DataProto.from_dict(
            tensors={"prompts": prompts, "responses": responses, "attention_mask": mask},
            non_tensors={
                "data_source": np.array(["aime2024"], dtype=object),
                "reward_model": np.array([{"ground_truth": "42", "style": "rule"}], dtype=object),
                "extra_info": np.array([{}], dtype=object),
            },
        )
        result = manager.loop.run_until_complete(manager.run_single(batch))
        scores[name] = {"score": result["reward_score"], "length": len(ids), "last_is_eos": ids[-1] == eos}
    return {"manager": manager_cls.__name__, "budget": budget, "scores": scores}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
