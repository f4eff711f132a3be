"""Hidden states and an output layer for the fused loss, and its comparison with the logits path.

:func:`check` calls this module's ``policy_loss`` and ``fused_policy_loss``: a test may replace either here (with
``monkeypatch``) to pass both paths an extra argument.
"""

from __future__ import annotations

import torch

from drgrpo import policy_loss
from drgrpo.fused import fused_policy_loss


def make(b=6, t=9, h=8, v=37, *, dtype=torch.float64, seed=0, bias=True, empty_row=True, tau=0.7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.6).to(dtype).requires_grad_(True)
    b_ = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_(True) if bias else None
    target = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    if empty_row:
        lengths[2] = 0
    mask = (torch.arange(t)[None] < lengths[:, None]).to(torch.float64)
    target = torch.where(mask.bool(), target, torch.full_like(target, -100))  # padding ids are garbage
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp = logits_logp(hidden.double(), weight.double(), target, None if b_ is None else b_.double(), tau)
    old = lp + 0.15 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = lp + 0.15 * torch.randn(b, t, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, bias=b_, target=target, mask=mask, adv=adv, old=old, ref=ref, tau=tau)


def logits_logp(hidden, weight, target, bias, tau):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    lp = torch.log_softmax((z / tau).to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
    return lp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)


def params(d):
    return [p for p in (d["hidden"], d["weight"], d["bias"]) if p is not None and p.requires_grad]


def both(d, config, *, chunk_size=5, old=True, ref=True, normalizer=None):
    """(logits-path output, its grads), (fused output, its grads)."""
    lp = logits_logp(d["hidden"], d["weight"], d["target"], d["bias"], d["tau"])
    kw = dict(ref_logp=d["ref"] if ref else None, normalizer=normalizer)
    ref_out = policy_loss(lp, d["old"] if old else None, d["adv"], d["mask"], config, **kw)
    ref_grads = torch.autograd.grad(ref_out.loss, params(d))
    out = fused_policy_loss(
        d["hidden"], d["weight"], d["target"], d["mask"], d["adv"], config,
        old_logp=d["old"] if old else None, bias=d["bias"], temperature=d["tau"], chunk_size=chunk_size, **kw,
    )  # fmt: skip
    grads = torch.autograd.grad(out.loss, params(d))
    return (ref_out, ref_grads, lp.detach()), (out, grads)


def assert_close(a, b, rtol, what):
    scale = b.abs().max().clamp_min(1e-30)
    err = ((a.double() - b.double()).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max relative error {err:.2e} > {rtol:.0e}"


def check(d, config, rtol, **kw):
    (ref_out, ref_grads, lp), (out, grads) = both(d, config, **kw)
    assert out.loss.shape == ()
    assert_close(out.loss, ref_out.loss, rtol, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, rtol, f"d loss / d {name}")
    m = d["mask"].bool()
    assert out.logp.shape == d["mask"].shape
    assert_close(out.logp[m], lp[m].to(out.logp.dtype), rtol, "logp")
    assert (out.logp[~m] == 0).all()
    assert set(out.metrics) == set(ref_out.metrics)
    for k in ref_out.metrics:  # absolute for values below 1: kl_mean of nearby log-probs cancels
        err = (out.metrics[k].double() - ref_out.metrics[k].double()).abs().item()
        assert err <= rtol * max(1.0, ref_out.metrics[k].abs().item()), f"metric {k}: error {err:.2e}"
