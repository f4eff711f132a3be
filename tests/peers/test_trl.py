"""``trl.<loss_type>`` presets against TRL's own GRPO code, on random ragged batches.

TRL's loss lives in ``GRPOTrainer._compute_loss`` and its advantages in
``GRPOTrainer._generate_and_score_completions``; both are called here as unbound methods on a
stand-in trainer (:class:`TRLStandIn`) that holds exactly the attributes they read, with
``GRPOConfig``'s own defaults. The model is replaced by the log-probs under test
(``_get_per_token_logps_and_entropies``), generation by fixed ragged completions (``_generate``)
and the reward functions by fixed rewards (``_calculate_rewards``): everything between (reward
scaling, NaN handling, ratios, clipping, KL, normalisers) is TRL's code.

Compared: advantages (float32, as TRL computes them), then loss and d loss / d logp in float64
given the same advantages. Tolerances are a few ulps, not loose bounds.
"""

from __future__ import annotations

import tempfile
import types
import zlib
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

from drgrpo.advantages import group_advantages  # noqa: E402
from drgrpo.config import LossConfig  # noqa: E402
from drgrpo.loss import policy_loss  # noqa: E402
from drgrpo.normalizer import StepNormalizer  # noqa: E402

GRPOTrainer = grpo_trainer.GRPOTrainer
GRPOConfig = trl.GRPOConfig

G = 4  # completions per prompt
B = 12  # three prompts
T = 9  # padded completion width


class _Accelerator:
    """One process: gather and reduce are the identity."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


class TRLStandIn:
    """The attributes GRPOTrainer's loss and advantage code read, set as ``GRPOTrainer.__init__`` sets them."""

    def __init__(self, args, *, logp=None, ref_logp=None, rewards=None, lengths=None, grad_accum=1):
        self.args = args
        self.accelerator = _Accelerator()
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


def trl_advantages(args, rewards, lengths, logp):
    stand_in = TRLStandIn(args, logp=logp.detach(), ref_logp=logp.detach(), rewards=rewards, lengths=lengths)
    out = GRPOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"}] * B)
    return out["advantages"], out["completion_mask"], out["num_items_in_batch"]


def trl_loss(args, inputs, logp, ref, grad_accum=1):
    logp = logp.detach().clone().requires_grad_(True)
    stand_in = TRLStandIn(args, logp=logp, ref_logp=ref, grad_accum=grad_accum)
    loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


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


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]

CASES = [
    pytest.param(lt, dict(scale_rewards=sr, beta=beta), id=f"{lt}-{sr}-beta{beta}")
    for lt in LOSS_TYPES
    for sr in ("group", "batch", "none")
    for beta in (0.0, 0.04)
]
CASES += [
    pytest.param(lt, extra, id=f"{lt}-{name}")
    for lt in LOSS_TYPES
    for name, extra in {
        "eps_high": dict(epsilon_high=0.28 if lt != "cispo" else 1.1),
        "sequence": dict(importance_sampling_level="sequence", beta=0.04),
        "kl-no-bias-correction": dict(beta=0.1, use_bias_correction_kl=False),
    }.items()
]
CASES += [pytest.param(lt, dict(delta=1.5, beta=0.04), id=f"{lt}-delta") for lt in ("grpo", "bnpo", "dr_grpo", "dapo")]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("loss_type", "extra"), CASES)
def test_trl_loss_and_grad(loss_type, extra, record):
    args = trl_args(loss_type, **extra)
    config = ours_for(args)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=zlib.crc32(f"{loss_type}{extra}".encode()))

    # advantages: TRL's float32 pipeline against ours on the same float32 rewards
    adv_trl, mask, num_items = trl_advantages(args, rewards, lengths, logp)
    adv_ours = group_advantages(rewards, G, config)
    assert adv_ours.dtype == adv_trl.dtype == torch.float32
    record(f"trl.{loss_type}", "trl 1.16.0", "advantages (fp32)", adv_ours, adv_trl)
    torch.testing.assert_close(adv_ours, adv_trl, rtol=2e-6, atol=2e-6)

    # loss and gradient in float64 on TRL's advantages
    adv = adv_trl.double()
    inputs = inputs_for(mask, adv, old, ref, num_items)
    loss_trl, grad_trl = trl_loss(args, inputs, logp, ref)
    loss_ours, grad_ours = our_loss(config, logp, old, adv, mask, ref)
    record(f"trl.{loss_type}", "trl 1.16.0", "loss (fp64)", loss_ours, loss_trl)
    record(f"trl.{loss_type}", "trl 1.16.0", "d loss/d logp (fp64)", grad_ours, grad_trl)
    assert grad_trl.abs().max() > 0  # the comparison is not vacuous
    if loss_type == "sapo":
        # TRL builds SAPO's temperatures with torch.where(A > 0, 1.0, 1.05): a float32 tensor even for
        # float64 inputs, so its tau_neg is 1.05 rounded to float32. That rounding is the whole difference:
        # with the same rounded tau the two agree to the last bits.
        assert float(loss_ours - loss_trl) != 0.0
        tau32 = dict(
            sapo_tau_pos=float(torch.tensor(config.sapo_tau_pos, dtype=torch.float32)),
            sapo_tau_neg=float(torch.tensor(config.sapo_tau_neg, dtype=torch.float32)),
        )
        loss_ours, grad_ours = our_loss(config.replace(**tau32), logp, old, adv, mask, ref)
        record(f"trl.{loss_type}", "trl 1.16.0", "loss, tau in fp32", loss_ours, loss_trl)
        record(f"trl.{loss_type}", "trl 1.16.0", "grad, tau in fp32", grad_ours, grad_trl)
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_trl_gradient_accumulation(loss_type, record):
    """Two micro-batches of one generation batch (gradient_accumulation_steps = steps_per_generation = 2).

    TRL divides grpo and dr_grpo by the accumulation steps and dapo by the generation batch's token
    count, which a StepNormalizer reproduces; bnpo divides by each micro-batch's own tokens, which
    the per-call ``trl.bnpo`` preset reproduces (summed, over 2 for TRL's accumulation scaling).
    """
    args = trl_args(loss_type, beta=0.04, gradient_accumulation_steps=2)
    assert args.steps_per_generation == 2
    config = ours_for(args)
    lengths, _, logp, old, ref, rewards = ragged_batch(seed=11)
    adv, mask, num_items = trl_advantages(args, rewards, lengths, logp)
    adv = adv.double()
    halves = [slice(0, B // 2), slice(B // 2, B)]

    loss_trl = torch.zeros((), dtype=torch.float64)
    grad_trl = torch.zeros_like(logp)
    for rows in halves:
        inputs = inputs_for(mask[rows], adv[rows], old[rows], ref[rows], num_items)
        loss, grad = trl_loss(args, inputs, logp[rows], ref[rows], grad_accum=2)
        loss_trl += loss
        grad_trl[rows] = grad

    loss_ours = torch.zeros((), dtype=torch.float64)
    grad_ours = torch.zeros_like(logp)
    if config.per_call_normalization:  # bnpo: local token mean per micro-batch, then TRL's / GA
        for rows in halves:
            loss, grad = our_loss(config, logp[rows], old[rows], adv[rows], mask[rows], ref[rows])
            loss_ours += loss / 2
            grad_ours[rows] = grad / 2
    else:
        step = StepNormalizer(num_tokens=float(mask.sum()), num_sequences=float(B), world_size=1)
        for rows in halves:
            loss, grad = our_loss(config, logp[rows], old[rows], adv[rows], mask[rows], ref[rows], normalizer=step)
            loss_ours += loss
            grad_ours[rows] = grad
        # and the split loss is the whole batch's loss
        whole, whole_grad = our_loss(config, logp, old, adv, mask, ref)
        torch.testing.assert_close(loss_ours, whole, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_ours, whole_grad, rtol=1e-12, atol=1e-14)
    record(f"trl.{loss_type}", "trl 1.16.0 (GA=2)", "loss (fp64)", loss_ours, loss_trl)
    record(f"trl.{loss_type}", "trl 1.16.0 (GA=2)", "d loss/d logp (fp64)", grad_ours, grad_trl)
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trl_defaults_are_the_presets_defaults():
    """The presets carry TRL's GRPOConfig defaults (read from TRL, not retyped)."""
    for loss_type in LOSS_TYPES:
        args = GRPOConfig(output_dir=tempfile.gettempdir(), report_to=[], use_cpu=True, loss_type=loss_type)
        preset = LossConfig.preset(f"trl.{loss_type}")
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        assert preset.beta == args.beta
        assert preset.kl_importance_weight == args.use_bias_correction_kl
        assert preset.advantage_std == args.scale_rewards
        assert preset.ratio_level == args.importance_sampling_level
        assert preset.delta == args.delta
        if loss_type == "cispo":
            assert preset.cispo_cap == eps_high and preset.clip_low is None
        else:
            assert (preset.clip_low, preset.clip_high) == (args.epsilon, eps_high)
        if loss_type == "dr_grpo":
            assert preset.max_completion_length == args.max_completion_length
        if loss_type == "sapo":
            assert (preset.sapo_tau_pos, preset.sapo_tau_neg) == (
                args.sapo_temperature_pos,
                args.sapo_temperature_neg,
            )
