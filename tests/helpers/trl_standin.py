"""TRL's ``GRPOTrainer`` loss and advantage code called as unbound methods on a stand-in trainer.

The stand-in (:class:`TRLStandIn`) holds exactly the attributes those methods read, set as ``GRPOTrainer.__init__``
sets them; the model is replaced by the log-probs under test, generation by fixed ragged completions and the reward
functions by fixed rewards (``tests/peers/test_trl.py`` says more). Importing this module skips the importing test
module where TRL is not installed.
"""

from __future__ import annotations

import math
import tempfile
import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

from drgrpo.config import LossConfig  # noqa: E402
from drgrpo.loss import policy_loss  # noqa: E402

GRPOTrainer = grpo_trainer.GRPOTrainer
GRPOConfig = trl.GRPOConfig


G = 4  # completions per prompt


B = 12  # three prompts


T = 9  # padded completion width


class OneProcessAccelerator:
    """One process: gather, reduce and padding across processes are the identity."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class TRLStandIn:
    """The attributes GRPOTrainer's loss and advantage code read, set as ``GRPOTrainer.__init__`` sets them."""

    def __init__(self, args, *, logp=None, ref_logp=None, rewards=None, lengths=None, grad_accum=1):
        self.args = args
        self.accelerator = OneProcessAccelerator()
        self.model = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
        # as in GRPOTrainer.__init__ (trl 1.16 grpo_trainer.py l.782, 819-834, 945-946)
        self.loss_type = args.loss_type
        self.beta = args.beta
        self.importance_sampling_level = args.importance_sampling_level
        self.scale_rewards = args.scale_rewards
        self.max_completion_length = args.max_completion_length
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.num_generations = args.num_generations
        self.num_iterations = args.num_iterations
        self.multi_objective_aggregation = args.multi_objective_aggregation
        self.mask_truncated_completions = args.mask_truncated_completions
        self.top_entropy_quantile = args.top_entropy_quantile
        self.off_policy_mask_threshold = args.off_policy_mask_threshold
        self.use_vllm = False
        self.current_gradient_accumulation_steps = grad_accum
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # generation side: one reward function of weight 1, no tools, no environments, no images
        self.environment_factories = None
        self.tools = None
        self.environments = None
        self._tokenizer = types.SimpleNamespace(pad_token_id=0)
        self.pad_to_multiple_of = None
        self.ref_model = object()
        self.reward_weights = torch.ones(1)
        self.reward_func_names = ["reward"]
        self._logs = {
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
            "images": [],
        }
        self._pending_extra_logs = {}
        self._pending_metrics = {}
        self.log_multimodal = False
        self._logp, self._ref_logp, self._rewards, self._lengths = logp, ref_logp, rewards, lengths

    # -- the model: returns the log-probs under test (and zero entropies)
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        if model is self.ref_model:
            return self._ref_logp, None, None
        return self._logp, torch.zeros_like(self._logp), None

    # -- generation: ragged completions of the given lengths
    def _generate(self, prompts):
        n = len(prompts)
        completion_ids = [[7] * int(length) for length in self._lengths]
        return [[1]] * n, completion_ids, None, ["completion"] * n, None, {}, None, None

    # -- rewards: one reward function returning the given rewards (NaN = None = unscorable)
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return self._rewards.view(-1, 1).to(torch.float32)


def trl_args(loss_type: str, **kwargs) -> GRPOConfig:
    kwargs.setdefault("max_completion_length", 13)  # != T, so a padded-width bug would show
    return GRPOConfig(
        output_dir=tempfile.gettempdir(),
        report_to=[],
        use_cpu=True,
        loss_type=loss_type,
        num_generations=G,
        per_device_train_batch_size=B,
        **kwargs,
    )


def ours_for(args: GRPOConfig) -> LossConfig:
    """The drgrpo preset with TRL's arguments translated to LossConfig field names."""
    overrides = {
        "beta": args.beta,
        "advantage_std": {"group": "group", "batch": "batch", "none": "none"}[args.scale_rewards],
        "ratio_level": args.importance_sampling_level,
        "kl_importance_weight": args.use_bias_correction_kl,
        "delta": args.delta,
    }
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.loss_type == "cispo":
        overrides["cispo_cap"] = eps_high  # TRL's CISPO cap IS epsilon_high
    else:
        overrides["clip_low"] = args.epsilon
        overrides["clip_high"] = eps_high
    if args.loss_type == "dr_grpo":
        overrides["max_completion_length"] = args.max_completion_length
    return LossConfig.preset(f"trl.{args.loss_type}", **overrides)


def ragged_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full row
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.01
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios ~ e^{+-0.3}: many clipped
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 2, (B,), generator=g).to(torch.float32) + 0.25 * torch.randn(B, generator=g)
    rewards[4:8] = 1.0  # a group without spread: advantage 0
    rewards[9] = float("nan")  # an unscorable completion: ignored, advantage 0
    return lengths, mask, logp, old, ref, rewards


def our_loss(config, logp, old, adv, mask, ref, normalizer=None):
    logp = logp.detach().clone().requires_grad_(True)
    out = policy_loss(logp, old, adv, mask, config, ref_logp=ref, normalizer=normalizer)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out.loss.detach(), grad


def inputs_for(mask, adv, old, ref, num_items):
    return {
        "prompt_ids": torch.ones(mask.shape[0], 1, dtype=torch.long),
        "prompt_mask": torch.ones(mask.shape[0], 1, dtype=torch.long),
        "completion_ids": torch.full_like(mask, 7),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,
    }


class StandIn(TRLStandIn):
    """TRLStandIn with TRL's own static helpers that ``_compute_loss`` calls for these options."""

    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)


class VLLMStandIn(StandIn):
    """TRLStandIn generating "with vLLM": ``_generate`` also reports the sampler's per-token log-probs."""

    def __init__(self, args, *, sampling, **kwargs):
        super().__init__(args, **kwargs)
        self.use_vllm = True
        self.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
        self.vllm_importance_sampling_mode = args.vllm_importance_sampling_mode
        self.vllm_importance_sampling_clip_min = args.vllm_importance_sampling_clip_min
        self.vllm_importance_sampling_clip_max = args.vllm_importance_sampling_clip_max
        self._sampling = sampling  # list of per-completion lists, None where not scored

    def _generate(self, prompts):
        prompt_ids, completion_ids, tool_mask, completions, _, extra, images, tool_images = super()._generate(prompts)
        return prompt_ids, completion_ids, tool_mask, completions, self._sampling, extra, images, tool_images


def sampler_lists(old: torch.Tensor, lengths: torch.Tensor, seed: int) -> tuple[list[list[float | None]], torch.Tensor]:
    """The sampler's log-probs: old + noise, None (not scored) at two tokens; and the same as a NaN-padded tensor."""
    g = torch.Generator().manual_seed(seed)
    # TRL turns the reported lists into a float32 tensor: report values that float32 holds exactly
    noisy = (old + 0.25 * torch.randn(old.shape, generator=g, dtype=old.dtype)).float().double()
    lists: list[list[float | None]] = [noisy[i, : int(n)].tolist() for i, n in enumerate(lengths)]
    lists[0][1] = None
    lists[5][0] = None
    dense = torch.full_like(old, math.nan)
    for i, row in enumerate(lists):
        dense[i, : len(row)] = torch.tensor([math.nan if x is None else x for x in row], dtype=old.dtype)
    return lists, dense


def trl_step(args, lengths, old, rewards, sampling_lists):
    """TRL's generation side: advantages, mask, the IS ratio and its metrics (old = the trainer's log-probs)."""
    stand_in = VLLMStandIn(
        args, sampling=sampling_lists, logp=old.clone(), ref_logp=old.clone(), rewards=rewards, lengths=lengths
    )
    out = GRPOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"}] * B)
    metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items() if k.startswith("sampling/")}
    return out, metrics


def trl_loss_vllm(args, inputs, logp, ref, sampling_lists):
    logp = logp.detach().clone().requires_grad_(True)
    stand_in = VLLMStandIn(args, sampling=sampling_lists, logp=logp, ref_logp=ref)
    loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


VESPO_FIELDS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")


def ours_for_vespo_luspo(args: GRPOConfig) -> LossConfig:
    """trl.<loss_type> with TRL's arguments under LossConfig's names, VESPO's four among them (clip and delta
    for the other loss types)."""
    fields = dict(
        beta=args.beta,
        advantage_std=args.scale_rewards,
        ratio_level=args.importance_sampling_level,
        kl_importance_weight=args.use_bias_correction_kl,
    )
    if args.loss_type == "vespo":
        fields.update({f: getattr(args, f) for f in VESPO_FIELDS})
    else:
        high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        fields.update(clip_low=args.epsilon, clip_high=high, delta=args.delta)
    return LossConfig.preset(f"trl.{args.loss_type}", **fields)


def trl_generation(args, lengths, logp, rewards):
    stand_in = StandIn(args, logp=logp.detach(), ref_logp=logp.detach(), rewards=rewards, lengths=lengths)
    return GRPOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"}] * B)
