"""``fused_policy_loss`` under the ``trl.*`` presets against Liger-Kernel's ``LigerFusedLinearGRPOLoss``.

Both take hidden states ``(B, T, H)`` and the output layer ``(V, H)`` and never build the logits of
the whole batch. Liger is run on CPU with ``compiled=False`` and a small ``chunk_size`` (several
chunks, so its per-chunk normalisers over the full mask are exercised), on random ragged float32
batches. Compared: the loss and the gradients with respect to ``hidden`` and ``weight``.
Tolerances are float32 rounding (both compute log-softmax in float32, in different orders).
"""

from __future__ import annotations

import zlib

import pytest
import torch

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

from drgrpo.config import LossConfig  # noqa: E402
from drgrpo.fused import fused_policy_loss  # noqa: E402

LigerFusedLinearGRPOLoss = liger_grpo.LigerFusedLinearGRPOLoss

B, T, H, V = 8, 6, 16, 40
TEMPERATURE = 0.9


def ragged_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = 0.4 * torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    with torch.no_grad():  # the current policy's log-probs, to place old/ref around them
        logits = (hidden.double() @ weight.double().T) / TEMPERATURE
        logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, generator=g)
    return hidden, weight, targets, mask, advantages, old, ref


def liger_run(kwargs, hidden, weight, targets, mask, advantages, old, ref):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    beta = kwargs.get("beta", 0.0)
    loss_fn = LigerFusedLinearGRPOLoss(
        compiled=False, chunk_size=3, temperature=TEMPERATURE, use_ref_model=beta != 0.0, **kwargs
    )
    loss, _metrics = loss_fn(
        h, w, targets, mask, advantages, ref_per_token_logps=ref if beta != 0.0 else None, old_per_token_logps=old
    )
    loss.backward()
    return loss.detach(), h.grad, w.grad


def ours_run(config, hidden, weight, targets, mask, advantages, old, ref):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_policy_loss(
        h,
        w,
        targets,
        mask,
        advantages.float(),
        config,
        old_logp=old,
        ref_logp=ref,
        temperature=TEMPERATURE,
        chunk_size=5,
    )
    out.loss.backward()
    return out.loss.detach(), h.grad, w.grad


def ours_for(kwargs) -> LossConfig:
    """The trl.<loss_type> preset (Liger mirrors TRL) with Liger's arguments as LossConfig fields."""
    loss_type = kwargs["loss_type"]
    overrides = {
        "beta": kwargs.get("beta", 0.0),
        "kl_importance_weight": kwargs.get("use_bias_correction_kl", False),  # Liger's default is False
        "ratio_level": kwargs.get("importance_sampling_level", "token"),
        "delta": kwargs.get("delta"),
    }
    eps_low, eps_high = kwargs.get("epsilon_low", 0.2), kwargs.get("epsilon_high", 0.2)
    if loss_type == "cispo":
        overrides["cispo_cap"] = eps_high
    else:
        overrides["clip_low"], overrides["clip_high"] = eps_low, eps_high
    if loss_type == "dr_grpo":
        overrides["max_completion_length"] = kwargs["max_completion_length"]
    return LossConfig.preset(f"trl.{loss_type}", **overrides)


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]


def _case(loss_type, **extra):
    kwargs = {"loss_type": loss_type, "beta": 0.0, **extra}
    if loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 11
    if loss_type == "cispo":
        kwargs.setdefault("epsilon_high", 1.15)  # a cap some ratios exceed
    name = "-".join(f"{k}={v}" for k, v in extra.items()) or "defaults"
    return pytest.param(kwargs, id=f"{loss_type}-{name}")


CASES = [_case(lt) for lt in LOSS_TYPES]
CASES += [_case(lt, beta=0.04) for lt in LOSS_TYPES]
CASES += [_case(lt, beta=0.04, use_bias_correction_kl=True) for lt in LOSS_TYPES]
CASES += [_case(lt, epsilon_low=0.1, epsilon_high=0.28) for lt in ("grpo", "dapo", "dr_grpo", "bnpo")]
CASES += [_case(lt, importance_sampling_level="sequence", beta=0.04) for lt in ("grpo", "dapo", "dr_grpo", "bnpo")]
CASES += [_case(lt, delta=1.5) for lt in ("grpo", "dapo")]


@pytest.mark.parametrize("kwargs", CASES)
def test_liger_fused_grpo_loss(kwargs, record):
    problem = ragged_problem(zlib.crc32(repr(sorted(kwargs.items())).encode()))
    loss_l, dh_l, dw_l = liger_run(kwargs, *problem)
    loss_o, dh_o, dw_o = ours_run(ours_for(kwargs), *problem)
    preset = f"trl.{kwargs['loss_type']}"
    record(preset, "liger-kernel 0.8.5", "fused loss (fp32)", loss_o, loss_l)
    record(preset, "liger-kernel 0.8.5", "d loss/d hidden (fp32)", dh_o, dh_l)
    record(preset, "liger-kernel 0.8.5", "d loss/d weight (fp32)", dw_o, dw_l)
    assert dw_l.abs().max() > 0 and dh_l.abs().max() > 0
    torch.testing.assert_close(loss_o, loss_l, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(dh_o, dh_l, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(dw_o, dw_l, rtol=2e-5, atol=2e-6)


def test_liger_with_output_bias(record):
    """An lm_head with a bias: loss and the gradients of hidden, weight and bias."""
    hidden, weight, targets, mask, advantages, old, ref = ragged_problem(7)
    bias = 0.3 * torch.randn(V, generator=torch.Generator().manual_seed(8))
    kwargs = {"loss_type": "dr_grpo", "max_completion_length": 11, "beta": 0.04}
    grads = []
    for which in ("liger", "ours"):
        h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
        if which == "liger":
            loss_fn = LigerFusedLinearGRPOLoss(compiled=False, chunk_size=3, temperature=TEMPERATURE, **kwargs)
            loss, _ = loss_fn(h, w, targets, mask, advantages, bias=b, ref_per_token_logps=ref, old_per_token_logps=old)
        else:
            loss = fused_policy_loss(
                h, w, targets, mask, advantages, ours_for(kwargs), old_logp=old, ref_logp=ref, bias=b,
                temperature=TEMPERATURE,
            ).loss  # fmt: skip
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad, b.grad))
    for name, theirs, ours in zip(("fused loss", "d loss/d hidden", "d loss/d weight", "d loss/d bias"), *grads):
        record("trl.dr_grpo", "liger-kernel 0.8.5", f"{name} (fp32, bias)", ours, theirs)
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
