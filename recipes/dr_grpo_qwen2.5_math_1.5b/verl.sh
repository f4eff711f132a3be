#!/usr/bin/env bash
# Dr. GRPO as the paper ran it: Qwen2.5-Math-1.5B on MATH levels 3-5, Qwen-Math template, in verl 0.9.1 with
# drgrpo's loss (loss_mode=drgrpo.dr_grpo; pip install -e '.[verl]' from a clone), one node of 8 GPUs:
#
#   python recipes/dr_grpo_qwen2.5_math_1.5b/prepare_math.py --out data/math_lvl3to5
#   bash recipes/dr_grpo_qwen2.5_math_1.5b/verl.sh [more verl overrides]
#
# Sources (the same as trl.yaml): [paper] Liu et al. 2025, arXiv 2503.20783; [1.5b] sail-sg/understand-r1-zero,
# examples/qwen2.5-math-1.5b.sh; [oat] sail-sg/oat, oat/args.py and oat/algorithms/ppo.py (defaults).
# Batches: verl counts prompts. 128 prompts x 8 completions per rollout ([1.5b] --rollout_batch_size 128,
# --num_samples 8); mini-batches of 16 prompts = 128 completions per optimizer step ([1.5b] --train_batch_size 128),
# one pass ([1.5b] --num_ppo_epochs 1): 8 optimizer steps per rollout. The micro-batch (4 completions per GPU) is a
# memory choice: drgrpo.dr_grpo takes verl's mini-batch counts, so the gradient does not depend on it.
# Reward: verl's rule grader for MATH (verl.utils.reward_score.math_reward) on every benchmark, and 0 for a
# completion cut off at the budget, as oat (verl_reward.py). Not the paper's: the grader is verl's, not oat's.
# Evaluation: every benchmark prepare_math.py wrote (test_*.parquet: MATH-500, and AIME 2024, AMC, Minerva Math,
# OlympiadBench where given), greedy, every 16 steps, each reported under its own name.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL=${MODEL:-Qwen/Qwen2.5-Math-1.5B}
DATA=${DATA:-data/math_lvl3to5/verl}
tests=()
for f in "$DATA"/test_*.parquet; do [ -e "$f" ] && tests+=("$f"); done
if [ ${#tests[@]} -eq 0 ]; then
    echo "verl.sh: no $DATA/test_*.parquet (DATA=$DATA); write them with prepare_math.py" >&2
    exit 2
fi
val_files=$(printf "'%s'," "${tests[@]}")

args=(
    # --- the loss: Dr. GRPO ([paper]: r - mean with no std; token sums over a constant L = the generation budget,
    #     [1.5b] --critic_type drgrpo uses masked_sum with constant_normalizer = generate_max_length = 3000)
    algorithm.adv_estimator=grpo
    algorithm.norm_adv_by_std_in_grpo=False
    actor_rollout_ref.actor.policy_loss.loss_mode=drgrpo.dr_grpo
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm
    actor_rollout_ref.actor.loss_scale_factor=3000
    actor_rollout_ref.actor.clip_ratio_low=0.2        # [oat] cliprange 0.2
    actor_rollout_ref.actor.clip_ratio_high=0.2
    actor_rollout_ref.actor.clip_ratio_c=null         # no dual clip: oat's PPO loss has none (verl's default is 3)
    actor_rollout_ref.actor.use_kl_loss=False         # [1.5b] --beta 0
    algorithm.use_kl_in_reward=False
    actor_rollout_ref.actor.entropy_coeff=0
    # --- the reward: verl's MATH grader whatever the benchmark, 0 for a truncated completion (verl_reward.py)
    reward.custom_reward_function.path="$HERE/verl_reward.py"
    reward.custom_reward_function.name=compute_score
    reward.reward_manager.source=importlib
    reward.reward_manager.name=TruncatedZeroRewardManager
    reward.reward_manager.module.path="$HERE/verl_reward.py"
    # --- data ([paper] MATH levels 3-5 with the Qwen-Math template, its minimalist recipe, prepared by
    #     prepare_math.py; [1.5b] --prompt_max_length 1024,
    #     --generate_max_length 3000, --num_prompt_epoch 20)
    data.train_files="$DATA/train.parquet"
    data.val_files="[${val_files%,}]"
    data.filter_overlong_prompts=True                 # prompts over max_prompt_length are dropped (verl logs the count)
    data.prompt_key=prompt
    data.max_prompt_length=1024
    data.max_response_length=3000
    data.train_batch_size=128                         # [1.5b] --rollout_batch_size 128 (prompts)
    trainer.total_epochs=20
    # --- model and optimizer ([1.5b] --pretrain, --gradient-checkpointing, --learning_rate 0.000001
    #     --lr_scheduler constant; [oat] adam_beta_1 0.9, adam_beta_2 0.95, l2 0.0, max_norm 1.0)
    actor_rollout_ref.model.path="$MODEL"
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.optim.lr_scheduler_type=constant
    actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0
    actor_rollout_ref.actor.optim.betas=[0.9,0.95]
    actor_rollout_ref.actor.optim.weight_decay=0.0
    actor_rollout_ref.actor.optim.clip_grad=1.0
    actor_rollout_ref.actor.ppo_mini_batch_size=16     # prompts: 16 x 8 = 128 completions per optimizer step
    actor_rollout_ref.actor.ppo_epochs=1              # [1.5b] --num_ppo_epochs 1
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
    # --- sampling with vLLM ([1.5b] --num_samples 8 --temperature 1 --top_p 1 --vllm_gpu_ratio 0.35;
    #     --eval_temperature 0)
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.n=8
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.gpu_memory_utilization=0.35
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8
    actor_rollout_ref.rollout.val_kwargs.do_sample=False  # [1.5b] --eval_temperature 0: greedy, one per question
    actor_rollout_ref.rollout.val_kwargs.temperature=0
    actor_rollout_ref.rollout.val_kwargs.n=1
    # --- one node of 8 GPUs ([1.5b] --gpus 8); no intermediate checkpoints ([1.5b] --save_steps -1)
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.save_freq=-1
    trainer.test_freq=16                              # [1.5b] --eval_steps 16 (counted in oat's steps)
    trainer.val_before_train=True                     # the base model's scores first
    trainer.logger=[console]
    trainer.project_name=drgrpo
    trainer.experiment_name=dr_grpo_qwen2.5_math_1.5b
)
python3 -m verl.trainer.main_ppo "${args[@]}" "$@"
