"""drgrpo.fused against the logits path: loss, metrics, log-probs and the gradients of hidden, weight, bias.

The logits path is ``policy_loss(log_softmax((h W^T + b) / tau)[y])`` with autograd; small sizes only.
Odd sizes on purpose: V = 37 (prime), T = 9 with chunks of 4 or 5 (T is not a multiple), ragged masks,
an empty row, padding targets = -100 (must be ignored).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drgrpo import LossConfig, StepNormalizer
from drgrpo.config import AGGREGATIONS
from drgrpo.fused import FusedPolicyLoss, chunked_logprobs, default_chunk_size, fused_policy_loss
from helpers.fused_batches import assert_close, both, check, logits_logp, make, params

CORE_PRESETS = ("dr_grpo", "grpo", "dapo", "bnpo", "gspo", "cispo", "sapo", "seed")
L = 12  # the constant of seq-mean-token-sum-norm


def preset(name: str, **overrides) -> LossConfig:
    return LossConfig.preset(name, max_completion_length=L, **overrides)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", CORE_PRESETS)
def test_every_core_preset_float64(name):
    # KL with ref_logp (used by grpo and seed, beta 0.04), temperature 0.7, bias, ragged + empty rows
    check(make(seed=1), preset(name), 1e-10)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_every_aggregation_float64(aggregation, ratio_level):
    config = preset("dapo", aggregation=aggregation, ratio_level=ratio_level, beta=0.02, kl="k3")
    check(make(seed=2), config, 1e-10)


@pytest.mark.parametrize("name", ["dapo", "gspo", "grpo"])
def test_float32_one_in_a_million(name):
    check(make(seed=3, dtype=torch.float32), preset(name), 1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 9, 10, 1000])
def test_chunk_sizes_agree(chunk_size):
    # T = 9: chunks of 4 or 5 straddle rows; 1 and 1000 are the extremes
    check(make(seed=4), preset("dapo"), 1e-10, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [3, 9, 40])
def test_sequence_level_chunks_of_whole_rows_or_two_passes(chunk_size):
    # GSPO couples a row: rows of up to 9 tokens fit chunks of 9 or 40 (one pass), not 3 (two passes)
    check(make(seed=5), preset("gspo", clip_low=0.05, clip_high=0.05), 1e-10, chunk_size=chunk_size)


def test_on_policy_old_logp_none():
    check(make(seed=6), preset("grpo"), 1e-10, old=False)


def test_no_bias_temperature_one_and_no_empty_row():
    d = make(seed=7, bias=False, empty_row=False, tau=1.0)
    check(d, preset("dr_grpo"), 1e-10)


def test_non_contiguous_hidden_and_bool_mask():
    # hidden as a trainer slices it from the model output: (B, T + 2, H)[:, 1:-1] is not contiguous
    d = make(seed=17)
    big = torch.randn(6, 11, 8, dtype=torch.float64, requires_grad=True)
    d["hidden"] = big[:, 1:-1]
    assert not d["hidden"].is_contiguous()
    d["mask"] = d["mask"].bool()
    (_, ref_grads, _), (_, grads) = both(d, preset("dapo"), chunk_size=4)
    assert_close(grads[0], ref_grads[0], 1e-10, "dh of a strided hidden")
    assert_close(grads[1], ref_grads[1], 1e-10, "dW of a strided hidden")


def test_step_normalizer():
    d = make(seed=8)
    norm = StepNormalizer(num_tokens=40.0, num_sequences=16.0, max_completion_length=20, world_size=2)
    check(d, preset("dapo"), 1e-10, normalizer=norm)
    check(d, preset("dr_grpo"), 1e-10, normalizer=norm)


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_documented_tolerance(seed):
    # bf16 inputs against a float32 logits path on the same (bf16-rounded) inputs. On-policy (ratio 1) so
    # that no token crosses a clip boundary because of rounding (that changes any bf16 path's gradient).
    d16 = make(seed=seed, h=64, v=301, dtype=torch.bfloat16, tau=0.9)
    d32 = {k: (v.detach().float().requires_grad_(True) if k in ("hidden", "weight", "bias") else v)
           for k, v in d16.items()}  # fmt: skip
    config = preset("grpo")  # with the k3 KL (beta 0.04)
    (ref_out, ref_grads, _), _ = both(d32, config, old=False)
    out = fused_policy_loss(
        d16["hidden"], d16["weight"], d16["target"], d16["mask"], d16["adv"], config,
        ref_logp=d16["ref"], bias=d16["bias"], temperature=d16["tau"], chunk_size=5,
    )  # fmt: skip
    assert out.loss.dtype == torch.float32 and out.logp.dtype == torch.float32
    grads = torch.autograd.grad(out.loss, params(d16))
    assert abs(out.loss.item() - ref_out.loss.item()) <= 2e-3 * abs(ref_out.loss.item())
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel <= 3e-2, f"bf16 gradient relative error {rel:.2e}"


@pytest.mark.slow
def test_gradcheck_float64():
    d = make(b=3, t=3, h=2, v=5, seed=10)
    for config in (preset("dapo"), preset("gspo", clip_low=0.5, clip_high=0.5), preset("seed")):

        def f(hidden, weight, bias, config=config):
            return fused_policy_loss(
                hidden, weight, d["target"], d["mask"], d["adv"], config,
                old_logp=d["old"], ref_logp=d["ref"], bias=bias, temperature=d["tau"], chunk_size=2,
            ).loss  # fmt: skip

        assert torch.autograd.gradcheck(f, (d["hidden"], d["weight"], d["bias"]))


# --------------------------------------------------------------------------- autograd plumbing


def test_backward_scales_by_upstream_gradient_and_accumulates():
    d = make(seed=11)
    config = preset("dapo")
    (_, ref_grads, _), _ = both(d, config)
    out = fused_policy_loss(d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], config,
                            old_logp=d["old"], bias=d["bias"], temperature=d["tau"], chunk_size=4,
                            ref_logp=d["ref"])  # fmt: skip
    (2.5 * out.loss + 1.0).backward(retain_graph=True)
    assert_close(d["weight"].grad, 2.5 * ref_grads[1], 1e-10, "scaled dW")
    assert_close(d["hidden"].grad, 2.5 * ref_grads[0], 1e-10, "scaled dh")
    d["weight"].grad = None
    out.loss.backward()  # the graph was retained: a second backward gives the same gradients again
    assert_close(d["weight"].grad, ref_grads[1], 1e-10, "dW of a second backward")


def test_frozen_weight_and_no_grad():
    d = make(seed=12)
    d["weight"].requires_grad_(False)
    d["bias"] = None
    config = preset("dapo")
    (ref_out, ref_grads, _), (out, grads) = both(d, config)
    assert len(grads) == 1
    assert_close(grads[0], ref_grads[0], 1e-10, "dh with a frozen lm_head")
    with torch.no_grad():
        out = fused_policy_loss(d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], config,
                                old_logp=d["old"], temperature=d["tau"])  # fmt: skip
    assert not out.loss.requires_grad
    assert_close(out.loss, ref_out.loss, 1e-10, "loss under no_grad")


def test_all_padding_gives_zero_loss_and_gradients():
    d = make(seed=13)
    d["mask"] = torch.zeros_like(d["mask"])
    out = fused_policy_loss(d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], preset("dapo"),
                            old_logp=d["old"], bias=d["bias"])  # fmt: skip
    out.loss.backward()
    assert out.loss.item() == 0
    assert (d["weight"].grad == 0).all() and (d["hidden"].grad == 0).all() and (d["bias"].grad == 0).all()


def test_module_wrapper_reads_the_output_layer():
    torch.manual_seed(0)
    lm_head = nn.Linear(8, 37, bias=True, dtype=torch.float64)
    d = make(seed=14, h=8, v=37)
    d["weight"], d["bias"] = lm_head.weight, lm_head.bias
    config = preset("grpo")
    (_, ref_grads, _), _ = both(d, config)
    loss_fn = FusedPolicyLoss(config, temperature=d["tau"], chunk_size=4)
    assert "chunk_size=4" in repr(loss_fn)
    out = loss_fn(d["hidden"], lm_head, d["target"], d["mask"], d["adv"], old_logp=d["old"], ref_logp=d["ref"])
    out.loss.backward()
    assert_close(lm_head.weight.grad, ref_grads[1], 1e-10, "lm_head.weight.grad")
    assert_close(lm_head.bias.grad, ref_grads[2], 1e-10, "lm_head.bias.grad")
    assert_close(d["hidden"].grad, ref_grads[0], 1e-10, "hidden.grad")
    # a bare weight tensor works too (no bias)
    out = loss_fn(d["hidden"].detach(), lm_head.weight.detach(), d["target"], d["mask"], d["adv"], ref_logp=d["ref"])
    assert out.loss.shape == ()


def entropy_oracle(d):
    """float64 per-token entropy of softmax((h W^T + b) / tau) from the full logits: logsumexp(z) - sum softmax(z) z."""
    with torch.no_grad():
        z = d["hidden"].double() @ d["weight"].double().T
        if d["bias"] is not None:
            z = z + d["bias"].double()
        z = z / d["tau"]
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


@pytest.mark.parametrize(
    ("dtype", "config", "chunk_size", "rtol"),
    [
        (torch.float64, "dapo", 5, 1e-12),
        (torch.float32, "dapo", 4, 1e-6),
        (torch.float32, "gspo", 4, 1e-6),  # whole rows per chunk, and two passes when a row is longer than 4
        (torch.float32, "gspo", 32, 1e-6),
        (torch.bfloat16, "dapo", 5, 1e-5),  # the products in bf16, the softmax in float32: vs the same rounded inputs
    ],
)
def test_entropy_from_the_fused_pass_is_the_full_logits_entropy(dtype, config, chunk_size, rtol):
    d = make(seed=21, dtype=dtype, v=53)
    rounded = {**d, "hidden": d["hidden"].detach().double(), "weight": d["weight"].detach().double(),
               "bias": d["bias"].detach().double()}  # fmt: skip
    kw = dict(old_logp=d["old"], bias=d["bias"], temperature=d["tau"], chunk_size=chunk_size)
    plain = fused_policy_loss(d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], preset(config), **kw)
    out = fused_policy_loss(
        d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], preset(config), compute_entropy=True, **kw
    )
    m = d["mask"].bool()
    assert plain.entropy is None and out.entropy is not None
    assert out.entropy.shape == d["mask"].shape and out.entropy.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    if dtype == torch.bfloat16:  # the oracle sees the bf16 product's rounding only through its inputs
        want = entropy_oracle(rounded)
        assert_close(out.entropy[m], want[m], 2e-2, "entropy (bf16 products)")
    else:
        assert_close(out.entropy[m], entropy_oracle(rounded)[m], rtol, "entropy")
    assert (out.entropy[~m] == 0).all()
    assert torch.equal(out.loss, plain.loss) and torch.equal(out.logp, plain.logp)  # the loss is untouched
    g_plain = torch.autograd.grad(plain.loss, params(d))
    g_out = torch.autograd.grad(out.loss, params(d))
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_out))


def test_entropy_without_gradients_and_over_scratch_blocks(monkeypatch):
    """No gradient needed (evaluation) still gives the entropy; a scratch of 2 rows walks the chunk in blocks."""
    import drgrpo.fused as fused

    monkeypatch.setattr(fused, "_ENTROPY_BLOCK_BYTES", 2 * 8 * 61)  # 2 rows of V = 61 float64
    d = make(seed=22, v=61)
    with torch.no_grad():
        out = fused_policy_loss(d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], preset("dr_grpo"),
                                bias=d["bias"], temperature=d["tau"], chunk_size=7, compute_entropy=True)  # fmt: skip
    m = d["mask"].bool()
    assert_close(out.entropy[m], entropy_oracle(d)[m], 1e-12, "entropy")
    # uniform logits: the entropy is log V
    flat = fused_policy_loss(torch.zeros(1, 3, 8), torch.zeros(61, 8), torch.zeros(1, 3, dtype=torch.long),
                             torch.ones(1, 3), torch.zeros(1), preset("dapo"), compute_entropy=True)  # fmt: skip
    assert torch.allclose(flat.entropy, torch.full((1, 3), float(torch.log(torch.tensor(61.0)))), rtol=1e-6)


def test_chunked_logprobs():
    d = make(seed=15)
    lp = logits_logp(d["hidden"], d["weight"], d["target"], d["bias"], d["tau"]).detach()
    got = chunked_logprobs(d["hidden"], d["weight"], d["target"], d["mask"], bias=d["bias"], temperature=d["tau"],
                           chunk_size=4)  # fmt: skip
    m = d["mask"].bool()
    assert_close(got[m], lp[m], 1e-12, "chunked_logprobs")
    assert (got[~m] == 0).all()
    full = chunked_logprobs(d["hidden"], d["weight"], d["target"].clamp_min(0), bias=d["bias"], temperature=d["tau"])
    assert_close(full, lp, 1e-12, "chunked_logprobs without mask")


def test_default_chunk_size():
    assert default_chunk_size(32000) == 1024
    assert default_chunk_size(151936) == 512  # float32 buffer capped at 320 MiB
    assert default_chunk_size(10**7) == 64
    for v in (1000, 50257, 151936, 262144):
        assert default_chunk_size(v) * v * 4 <= 320 * 2**20 or default_chunk_size(v) == 64


# --------------------------------------------------------------------------- errors


def call(d, **overrides):
    kw = dict(hidden=d["hidden"], weight=d["weight"], target_ids=d["target"], mask=d["mask"], advantages=d["adv"],
              config=preset("dapo"))  # fmt: skip
    kw.update(overrides)
    return fused_policy_loss(**kw)


def test_error_hidden_weight_size_mismatch():
    d = make()
    with pytest.raises(ValueError, match=r"hidden size mismatch.*weight.shape\[1\] == 8"):
        call(d, weight=torch.randn(37, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"did you pass weight\.T"):
        call(d, weight=torch.randn(8, 37, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hidden must be \(B, T, H\)"):
        call(d, hidden=d["hidden"].reshape(-1, 8))


def test_error_target_ids_out_of_range():
    d = make()
    bad = d["target"].clone()
    bad[0, 0] = 37
    with pytest.raises(ValueError, match=r"target_ids must be in \[0, V\) = \[0, 37\).*got 37 at position \(0, 0\)"):
        call(d, target_ids=bad)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="got -1"):
        call(d, target_ids=bad)
    with pytest.raises(TypeError, match="integer"):
        call(d, target_ids=d["target"].double())


def test_error_mixed_dtypes():
    d = make()
    with pytest.raises(TypeError, match=r"hidden is torch\.float32 but weight is torch\.float64"):
        call(d, hidden=d["hidden"].float())
    with pytest.raises(TypeError, match=r"bias is torch\.float32"):
        call(d, bias=torch.zeros(37))


def test_error_chunk_size_and_temperature():
    d = make()
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            call(d, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        call(d, chunk_size=2.5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        call(d, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        FusedPolicyLoss(preset("dapo"), chunk_size=0)


def test_error_shapes_and_missing_ref():
    d = make()
    with pytest.raises(ValueError, match="mask must have shape"):
        call(d, mask=d["mask"][:, :-1])
    with pytest.raises(ValueError, match="advantages must have shape"):
        call(d, advantages=d["adv"][:-1])
    with pytest.raises(ValueError, match="bias must have shape"):
        call(d, bias=torch.zeros(36, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs ref_logp"):
        call(d, config=preset("grpo"))


def nonfinite(x, pos, value):
    x = x.detach().clone()
    x[pos] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_error_non_finite_hidden_weight_bias(value):
    # make(): row 0 is all real, row 2 all padding; the message names the first bad element
    d = make()
    with pytest.raises(ValueError, match=rf"hidden has a non-finite value {value} at position \(0, 4, 3\)"):
        call(d, hidden=nonfinite(d["hidden"], (0, 4, 3), value))
    with pytest.raises(ValueError, match=rf"weight has a non-finite value {value} at position \(11, 6\)"):
        call(d, weight=nonfinite(d["weight"], (11, 6), value))
    with pytest.raises(ValueError, match=rf"bias has a non-finite value {value} at position \(36,\)"):
        call(d, bias=nonfinite(d["bias"], 36, value))
    with pytest.raises(ValueError, match=rf"old_logp has a non-finite value {value} at position \(0, 1\)"):
        call(d, old_logp=nonfinite(d["old"], (0, 1), value))


def test_non_finite_hidden_on_padding_is_ignored_like_policy_loss():
    # policy_loss ignores padding; the fused path computes nothing there, so it may hold anything too
    d = make()
    assert d["mask"][2].sum() == 0 and d["mask"][1, -1] == 0
    hidden = nonfinite(nonfinite(d["hidden"], (2, 0, 0), float("nan")), (1, -1, 5), float("inf"))
    out = call(d, hidden=hidden.requires_grad_(True))
    reference = call(d)  # the same real tokens
    assert torch.isfinite(out.loss) and out.loss.item() == reference.loss.item()


def test_validate_false_skips_the_data_checks():
    d = make()
    out = call(d, hidden=nonfinite(d["hidden"], (0, 0, 0), float("nan")), validate=False)
    assert torch.isnan(out.loss)  # not refused: the caller asked for no data checks
    with pytest.raises(ValueError, match="mask must have shape"):  # shapes are checked either way
        call(d, mask=d["mask"][:, :-1], validate=False)
    module = FusedPolicyLoss(preset("dapo"), validate=False)
    hidden = nonfinite(d["hidden"], (0, 0, 0), float("nan"))
    assert torch.isnan(module(hidden, d["weight"], d["target"], d["mask"], d["adv"]).loss)


def test_error_device_mismatch_names_the_argument():
    # the meta device stands for a second device on a machine without a GPU
    d = make()
    meta = torch.device("meta")
    with pytest.raises(ValueError, match=r"advantages is on meta but logp is on cpu; move them to one device"):
        call(d, advantages=d["adv"].to(meta))
    with pytest.raises(ValueError, match=r"old_logp is on meta but logp is on cpu"):
        call(d, old_logp=d["old"].to(meta))
    with pytest.raises(ValueError, match=r"weight is on meta but hidden is on cpu"):
        call(d, weight=d["weight"].detach().to(meta))


# --------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    d = make(seed=16, h=64, v=1001, dtype=dtype)
    config = preset("grpo")
    kw = dict(old_logp=d["old"], ref_logp=d["ref"], temperature=d["tau"], chunk_size=7)
    cpu = fused_policy_loss(d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], config, bias=d["bias"], **kw)
    cpu_grads = torch.autograd.grad(cpu.loss, params(d))
    dc = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
          for k, v in d.items()}  # fmt: skip
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = fused_policy_loss(dc["hidden"], dc["weight"], dc["target"], dc["mask"], dc["adv"], config, bias=dc["bias"],
                            **kw)  # fmt: skip
    gpu_grads = torch.autograd.grad(gpu.loss, params(dc))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert abs(gpu.loss.item() - cpu.loss.item()) <= tol * abs(cpu.loss.item())
    for a, b in zip(gpu_grads, cpu_grads):
        assert ((a.cpu().float() - b.float()).norm() / b.float().norm()).item() <= tol
