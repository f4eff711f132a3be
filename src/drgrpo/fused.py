r"""The policy loss straight from hidden states, without ever holding the ``(N, V)`` logits.

:func:`fused_policy_loss` returns :func:`drgrpo.policy_loss`'s loss, metrics and gradients for the hidden states
``h (B, T, H)``, the output layer ``W (V, H)`` and its bias, holding one chunk of rows of the logits at a time
(extra memory ``O(chunk_size * V)``): one visit per chunk computes the logits, the log-softmax and the gradient
(three ``N x H x V`` products, no recomputation; :func:`default_chunk_size` bounds the buffer). The derivation,
GSPO's whole-row chunks, the entropy, and the precision in bf16/fp16: docs/design.md, section 9.2; measurements:
docs/fused.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from drgrpo.aggregation import token_weights
from drgrpo.config import LossConfig
from drgrpo.entropy import entropy_threshold, high_entropy_mask
from drgrpo.loss import (
    LossOutput,
    check_entropy_inputs,
    compute_dtype,
    per_token_loss,
    policy_loss,
    validate_inputs,
)
from drgrpo.surrogates import BATCH_COUPLED, get_surrogate
from drgrpo.validation import check_finite_large, check_finite_rows, check_shape

if TYPE_CHECKING:
    from drgrpo.normalizer import StepNormalizer

__all__ = ["FusedPolicyLoss", "chunked_logprobs", "default_chunk_size", "fused_policy_loss"]

# Rows per chunk. Each chunk reads W twice and reads and writes the float32 dW once, so fewer, taller
# chunks are faster (work per byte moved grows with the rows, not with V); measured with
# benchmarks/fused.py on 2 AMD EPYC (Zen 5) cores, time / matmul floor at N = 2048, H = 512:
#   V = 32000:  256 rows 1.34x, 512 rows 1.18x, 1024 rows 1.13x
#   V = 151936: 128 rows 1.29x, 256 rows 1.14x, 512 rows 1.08x
# The float32 buffer (rows x V) is capped at 320 MiB, so the extra memory stays O(chunk x V) with a
# constant that does not grow with N.
_CHUNK_BYTES = 320 * 2**20
_MIN_CHUNK = 64
_MAX_CHUNK = 1024
_ENTROPY_BLOCK_BYTES = 32 * 2**20  # the entropy's scratch buffer (rows x V, float32)


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``: 1024, or fewer (a multiple of 64) to keep the float32
    logits buffer under 320 MiB (512 rows at V = 151936)."""
    rows = _CHUNK_BYTES // (4 * max(int(vocab_size), 1)) // 64 * 64
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, rows)))


# --------------------------------------------------------------------------- the chunk kernels


@dataclass
class _Problem:
    """Everything one fused call needs besides the differentiable tensors (built by :func:`fused_policy_loss`)."""

    target_ids: Tensor  # (N,) int64
    mask: Tensor  # (B, T) as given
    advantages: Tensor  # (B,)
    config: LossConfig
    old_logp: Tensor | None  # (B, T)
    ref_logp: Tensor | None  # (B, T)
    sampling_logp: Tensor | None  # (B, T) the sampler's log-probs (vLLM's)
    normalizer: Any  # StepNormalizer | None
    temperature: float
    chunk_size: int
    need_dh: bool
    need_dw: bool
    need_db: bool
    compute_entropy: bool = False
    entropy_threshold: Any = None  # Tensor | float | None: the entropy mask's threshold, if given
    metrics: dict[str, Tensor] | None = None
    logp: Tensor | None = None  # (B, T) output, detached
    entropy: Tensor | None = None  # (B, T) output, detached (compute_entropy)


class _Chunker:
    """Computes one chunk of real tokens: logits, log-softmax in place, and the three-product gradients."""

    def __init__(self, h2d: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tau: float, rows: int):
        self.h2d, self.weight, self.bias, self.targets, self.tau = h2d, weight, bias, targets, tau
        self.cdt = weight.dtype  # the products run in the input dtype
        self.adt = compute_dtype(weight.dtype)  # softmax / logp / accumulation dtype
        v = weight.shape[0]
        self.z = torch.empty(rows, v, dtype=self.adt, device=weight.device)  # (chunk, V): the only big buffer
        # Half precision: the product is written in the input dtype, then upcast into z (and z is cast back
        # down for products 2 and 3).
        self.z_low = torch.empty(rows, v, dtype=self.cdt, device=weight.device) if self.cdt != self.adt else None
        # CPU's log-softmax kernel works row by row and may write over its input; elsewhere use a second buffer.
        self.inplace = weight.device.type == "cpu"
        self.bias_scaled = None if bias is None else (bias / tau if tau != 1.0 else bias)
        self.dw_fresh = True  # dW is allocated uninitialised; the first product writes it
        self.dw_low: Tensor | None = None  # half precision: product 3's output before the float32 accumulation
        self.scratch: Tensor | None = None  # (a few rows, V): the entropy's p log p

    def log_softmax(self, pos: Tensor | slice) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``pos`` of the flat hidden states (index tensor, or a slice when contiguous: no copy)
        -> (log_softmax(z) (n, V) in adt, h_c (n, H), y_c (n,))."""
        h_c = self.h2d[pos]  # (n, H)
        y_c = self.targets[pos]  # (n,)
        n = h_c.shape[0]
        h_s = h_c * (1.0 / self.tau) if self.tau != 1.0 else h_c  # fold 1/tau into the small operand
        out = self.z[:n] if self.z_low is None else self.z_low[:n]
        if self.bias_scaled is None:
            torch.mm(h_s, self.weight.t(), out=out)  # matmul 1: (n, H) x (H, V)
        else:
            torch.addmm(self.bias_scaled, h_s, self.weight.t(), out=out)
        z = self.z[:n]
        if self.z_low is not None:
            z.copy_(out)
        if self.inplace:
            torch.ops.aten._log_softmax.out(z, 1, False, out=z)
        else:
            z = torch.log_softmax(z, dim=1)
        return z, h_c, y_c

    def entropy(self, z: Tensor, *, leave_probs: bool) -> Tensor:
        """``H_n = -sum_v p_nv log p_nv`` ``(n,)`` of the log-softmax rows ``z`` (n, V), a few rows at a time.

        ``leave_probs``: overwrite ``z`` with ``p = exp(z)``, which the gradient pass needs next, from the same
        ``exp`` (otherwise ``z`` is left as it is).
        """
        n, v = z.shape
        rows = max(1, min(n, _ENTROPY_BLOCK_BYTES // (z.element_size() * v)))
        if self.scratch is None or self.scratch.shape[0] < rows:
            self.scratch = torch.empty(rows, v, dtype=z.dtype, device=z.device)
        out = torch.empty(n, dtype=z.dtype, device=z.device)
        for s in range(0, n, rows):
            logp = z[s : s + rows]
            p = torch.exp(logp, out=self.scratch[: logp.shape[0]])
            if leave_probs:
                torch.sum(logp.mul_(p), dim=1, out=out[s : s + rows])  # z rows: p log p
                logp.copy_(p)  # z rows: p
            else:
                torch.sum(p.mul_(logp), dim=1, out=out[s : s + rows])  # scratch rows: p log p
        return out.neg_()

    def bonus_grad(self, z: Tensor, y_c: Tensor, g: Tensor, c: Tensor, h: Tensor) -> None:
        """Overwrite the log-softmax rows ``z`` (n, V) with ``D = g (p - onehot(y)) - c p (log p + H)``: minus
        d loss / d z of the policy term (``g = d loss / d logp``) and of the bonus ``-c H`` (dH/dz = -p (log p + H)),
        a few rows at a time through the scratch buffer (one more ``exp`` than the entropy alone)."""
        n, v = z.shape
        rows = max(1, min(n, _ENTROPY_BLOCK_BYTES // (z.element_size() * v)))
        if self.scratch is None or self.scratch.shape[0] < rows:
            self.scratch = torch.empty(rows, v, dtype=z.dtype, device=z.device)
        scale = (g - c * h)[:, None]  # (n, 1)
        for s in range(0, n, rows):
            logp = z[s : s + rows]
            p = torch.exp(logp, out=self.scratch[: logp.shape[0]])
            logp.mul_(p).mul_(-c[s : s + rows, None])  # -c p log p
            logp.add_(p.mul_(scale[s : s + rows]))  # + (g - c H) p
        z[torch.arange(n, device=z.device), y_c] -= g

    def grads(
        self,
        z: Tensor,
        h_c: Tensor,
        y_c: Tensor,
        g: Tensor,
        dh: Tensor | None,
        pos: Tensor | slice,
        dw: Tensor | None,
        db: Tensor | None,
        *,
        probs: bool = False,
        scaled: bool = False,
    ) -> None:
        """Given log_softmax ``z`` (n, V) (or, with ``probs``, already ``p = exp(z)``) and ``g = dloss/dlogp``
        (n,), add this chunk's dh, dW, db. ``scaled``: ``z`` already holds ``g (p - onehot) + ...``
        (:meth:`bonus_grad`), so ``g`` is not applied again."""
        n = z.shape[0]
        a = (torch.ones_like(g) if scaled else g) / self.tau  # (n,)
        # d = p - onehot(y) in place: the onehot term rides along in the products (no scatter into dW).
        d = z if probs or scaled else z.exp_()
        if not scaled:
            d[torch.arange(n, device=d.device), y_c] -= 1.0
        d_mm = d
        if self.z_low is not None and (dh is not None or dw is not None):
            d_mm = self.z_low[:n]
            d_mm.copy_(d)
        if dh is not None:
            # dh_n = a_n (W[y_n] - p_n W) = -a_n (d_n W)
            if isinstance(pos, slice):
                q = torch.mm(d_mm, self.weight, out=dh[pos])  # matmul 2: (n, V) x (V, H), written in place
                q.mul_((-a)[:, None])
            else:
                q = torch.mm(d_mm, self.weight)
                dh[pos] = (q.to(self.adt) * (-a)[:, None]).to(dh.dtype)
        if dw is not None:
            ah = h_c.to(self.adt) * a[:, None]  # (n, H)
            beta = 0.0 if self.dw_fresh else 1.0  # first chunk overwrites the uninitialised buffer (no zero fill)
            if self.z_low is None:
                torch.addmm(dw, d_mm.t(), ah, beta=beta, alpha=-1.0, out=dw)  # matmul 3: (V, n) x (n, H)
            else:  # half precision: product in the input dtype, accumulated in float32
                if self.dw_low is None:
                    self.dw_low = torch.empty_like(self.weight)
                torch.mm(d_mm.t(), ah.to(self.cdt), out=self.dw_low)
                if self.dw_fresh:
                    torch.mul(self.dw_low, -1.0, out=dw)
                else:
                    dw.sub_(self.dw_low)
            self.dw_fresh = False
        if db is not None:
            db.addmv_(d.t(), a, alpha=-1.0)


def _chunks_of(counts: list[int], limit: int, whole_rows: bool) -> list[tuple[int, int]] | None:
    """Ranges [start, end) over the real tokens (row-major). Whole rows when ``whole_rows``; None if a row
    alone is longer than ``limit`` (then the caller uses two passes)."""
    total = sum(counts)
    if not whole_rows:
        return [(s, min(s + limit, total)) for s in range(0, total, limit)]
    ranges: list[tuple[int, int]] = []
    start = end = 0
    for c in counts:
        if c > limit:
            return None
        if end + c - start > limit:
            ranges.append((start, end))
            start = end
        end += c
    if end > start:
        ranges.append((start, end))
    return ranges


def _run(problem: _Problem, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Any, Any, Any]:
    """The whole fused computation: returns (loss, dh, dW, db); sets problem.logp and problem.metrics."""
    cfg = problem.config
    b, t, hdim = hidden.shape
    adt = compute_dtype(weight.dtype)
    device = hidden.device
    h2d = hidden.reshape(b * t, hdim)
    if not h2d.is_contiguous():
        h2d = h2d.contiguous()
    real = problem.mask.bool()
    counts = real.sum(1).tolist()  # one device sync
    pos_all = real.reshape(-1).nonzero().squeeze(1)  # (n_real,) row-major flat positions
    pos_cpu = pos_all.cpu()
    rows_cpu = (pos_cpu // t).tolist() if pos_cpu.numel() else []
    weights = token_weights(problem.mask.to(adt), cfg, problem.normalizer)  # (B, T), constant in logp
    # A token's loss that reads other tokens of its row: the sequence ratio (GSPO), a whole-row surrogate,
    # the sequence correction weight, the off-policy mask. Chunks then hold whole rows.
    row_coupled = (
        cfg.ratio_level != "token"
        or get_surrogate(cfg.surrogate).whole_rows
        or (cfg.sampling_correction or "").startswith("sequence")
        or cfg.off_policy_mask_threshold is not None
    )
    ranges = _chunks_of(counts, problem.chunk_size, whole_rows=row_coupled)
    two_pass = ranges is None
    if two_pass:
        ranges = _chunks_of(counts, problem.chunk_size, whole_rows=False)
    assert ranges is not None
    masked = cfg.top_entropy_quantile < 1
    bonus = cfg.entropy_coef != 0
    threshold = problem.entropy_threshold
    # The mask's per-call threshold, or the bonus's per-call count of masked tokens, needs every entropy first.
    first_pass = two_pass or (masked and (threshold is None or (bonus and problem.normalizer is None)))

    chunker = _Chunker(
        h2d, weight, bias, problem.target_ids, problem.temperature, max((e - s for s, e in ranges), default=0)
    )
    logp_flat = torch.zeros(b * t, dtype=adt, device=device)
    entropy_flat = torch.zeros(b * t, dtype=adt, device=device) if problem.compute_entropy else None
    dh = torch.zeros(b * t, hdim, dtype=hidden.dtype, device=device) if problem.need_dh else None
    dw = torch.empty(weight.shape, dtype=adt, device=device) if problem.need_dw else None
    db = torch.zeros(weight.shape[0], dtype=adt, device=device) if problem.need_db and bias is not None else None
    need_grad = dh is not None or dw is not None or db is not None

    def rows_at(s: int, e: int) -> Tensor | slice:
        """Flat positions of real tokens s..e-1: a slice when contiguous (all-real rows), else an index tensor."""
        first, last = int(pos_cpu[s]), int(pos_cpu[e - 1])
        return slice(first, last + 1) if last - first == e - s - 1 else pos_all[s:e]

    keep_flat: Tensor | None = None  # (B*T,) bool: the entropy mask, once known

    def chunk_grad(s: int, e: int, logp_c: Tensor) -> Tensor:
        """g = d(sum_n w_n l_n)/d logp_n for real tokens s..e-1 (rows r0..r1 only; rows never interact)."""
        r0, r1 = rows_cpu[s], rows_cpu[e - 1]
        pos = pos_all[s:e]
        rr, cc = pos // t - r0, pos % t
        sub = slice(r0, r1 + 1)
        sel = torch.zeros(r1 + 1 - r0, t, dtype=torch.bool, device=device)
        sel[rr, cc] = True  # for whole-row chunks this is exactly mask[sub]
        with torch.enable_grad():
            leaf = logp_c.detach().requires_grad_(True)
            lp = torch.zeros(r1 + 1 - r0, t, dtype=adt, device=device).index_put((rr, cc), leaf)
            keep = None
            if keep_flat is not None:
                keep = torch.zeros(r1 + 1 - r0, t, dtype=torch.bool, device=device)
                keep[rr, cc] = keep_flat[pos]
            terms = per_token_loss(
                lp,
                None if problem.old_logp is None else problem.old_logp[sub],
                problem.advantages[sub],
                sel,
                cfg,
                None if problem.ref_logp is None else problem.ref_logp[sub],
                None if problem.sampling_logp is None else problem.sampling_logp[sub],
                keep,
            )
            (g,) = torch.autograd.grad((terms.loss * weights[sub]).sum(), leaf)
        return g

    if first_pass and need_grad:
        # Pass 1 (a row longer than a chunk with a sequence-level ratio, or the entropy mask's per-call threshold):
        # logp (and entropy) of every real token, no gradient.
        for s, e in ranges:
            pos = rows_at(s, e)
            z, _, y_c = chunker.log_softmax(pos)
            logp_flat[pos] = z.gather(1, y_c[:, None]).squeeze(1)
            if entropy_flat is not None:
                entropy_flat[pos] = chunker.entropy(z, leave_probs=False)
    bonus_c: Tensor | float = 0.0
    if masked and need_grad:
        assert entropy_flat is not None
        if first_pass:  # every entropy is known: the per-call threshold, and the mask at once
            ent2d = entropy_flat.reshape(b, t)
            if threshold is None:
                threshold = entropy_threshold(ent2d, problem.mask, cfg.top_entropy_quantile)
            keep_flat = high_entropy_mask(ent2d, problem.mask, threshold).reshape(-1)
        else:  # a given threshold: each chunk's mask from its own entropies, below
            keep_flat = torch.zeros(b * t, dtype=torch.bool, device=device)
    if bonus and need_grad:
        # d loss / d H_n = -c_n: the coefficient over the tokens the bonus averages over
        if problem.normalizer is not None:
            count = max(problem.normalizer.num_tokens, 1.0) / problem.normalizer.world_size
            bonus_c = cfg.entropy_coef / count
        else:
            acting = real.reshape(-1) if keep_flat is None else keep_flat
            bonus_c = cfg.entropy_coef / acting.sum().clamp_min(1).to(adt)
    g_all = None
    if two_pass and need_grad and pos_all.numel():
        g_all = chunk_grad(0, pos_all.numel(), logp_flat[pos_all])
    for s, e in ranges:
        pos = rows_at(s, e)
        z, h_c, y_c = chunker.log_softmax(pos)
        logp_c = z.gather(1, y_c[:, None]).squeeze(1)  # (n,)
        logp_flat[pos] = logp_c
        if bonus and need_grad:  # keep z as log p: the bonus's gradient needs both p and log p
            ent_c = chunker.entropy(z, leave_probs=False)
            entropy_flat[pos] = ent_c  # type: ignore[index]
            if keep_flat is not None and not first_pass:
                keep_flat[pos] = ent_c >= threshold
            g = g_all[s:e] if g_all is not None else chunk_grad(s, e, logp_c)
            c = torch.full_like(g, 1.0) * bonus_c
            if keep_flat is not None:
                c = c * keep_flat[pos_all[s:e]].to(g.dtype)
            chunker.bonus_grad(z, y_c, g, c, ent_c)
            chunker.grads(z, h_c, y_c, g, dh, pos, dw, db, scaled=True)
            continue
        if entropy_flat is not None:  # with gradients to come, z becomes p here (one exp for both)
            entropy_flat[pos] = chunker.entropy(z, leave_probs=need_grad)
            if keep_flat is not None and not first_pass:
                keep_flat[pos] = entropy_flat[pos] >= threshold
        if need_grad:
            g = g_all[s:e] if g_all is not None else chunk_grad(s, e, logp_c)
            chunker.grads(z, h_c, y_c, g, dh, pos, dw, db, probs=entropy_flat is not None)

    if dw is not None and chunker.dw_fresh:  # no real token at all
        dw.zero_()
    logp = logp_flat.reshape(b, t)
    out = policy_loss(
        logp,
        problem.old_logp,
        problem.advantages,
        problem.mask,
        cfg,
        ref_logp=problem.ref_logp,
        sampling_logp=problem.sampling_logp,
        entropy=None if entropy_flat is None else entropy_flat.reshape(b, t),
        entropy_threshold=threshold,
        normalizer=problem.normalizer,
        validate=False,
    )
    problem.logp, problem.metrics = logp, out.metrics
    problem.entropy = None if entropy_flat is None else entropy_flat.reshape(b, t)
    return (
        out.loss,
        None if dh is None else dh.reshape(b, t, hdim),
        None if dw is None else dw.to(weight.dtype),
        None if db is None or bias is None else db.to(bias.dtype),
    )


class _FusedLinearPolicyLoss(torch.autograd.Function):
    """Forward does everything (loss and gradients); backward hands the stored gradients over, scaled."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, problem: _Problem) -> Tensor:  # type: ignore[override]
        loss, dh, dw, db = _run(problem, hidden, weight, bias)
        ctx.grads = (dh, dw, db)
        ctx.problem = problem
        ctx.save_for_backward(hidden, weight, bias)  # only for a second backward through a retained graph
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is not None:
            # Hand the tensors over (no reference kept): autograd then makes dW the weight's .grad without a copy.
            (dh, dw, db), ctx.grads = ctx.grads, None
        else:  # a second backward through a retained graph (e.g. gradcheck): recompute
            hidden, weight, bias = ctx.saved_tensors
            with torch.no_grad():
                _, dh, dw, db = _run(ctx.problem, hidden, weight, bias)
        if not ctx.needs_input_grad[0]:
            dh = None
        # Skip the multiply for the usual loss.backward() (grad 1); a CPU comparison costs no device sync.
        if not (grad_loss.device.type == "cpu" and bool(grad_loss == 1)):
            dh, dw, db = (None if x is None else x * grad_loss.to(x.dtype) for x in (dh, dw, db))
        return dh, dw, db, None


# --------------------------------------------------------------------------- public API


def fused_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    advantages: Tensor,
    config: LossConfig,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    sampling_logp: Tensor | None = None,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    normalizer: StepNormalizer | None = None,
    compute_entropy: bool = False,
    entropy_threshold: Tensor | float | None = None,
    validate: bool = True,
) -> LossOutput:
    r"""``policy_loss(log_softmax((hidden @ weight.T + bias) / temperature)[target_ids], ...)`` without the logits.

    Args:
        hidden: ``(B, T, H)`` last hidden states of the completion tokens (float32, float64, bf16 or fp16).
        weight: ``(V, H)`` output layer (``lm_head.weight``), same dtype and device as ``hidden``.
        target_ids: ``(B, T)`` integer ids of the sampled tokens, in ``[0, V)`` where ``mask`` is 1
            (padding may hold anything, e.g. -100).
        mask: ``(B, T)`` 0/1: 1 on real completion tokens. Padding is skipped (costs nothing).
        advantages: ``(B,)`` one advantage per completion.
        config: a :class:`~drgrpo.config.LossConfig`; every surrogate, ratio level, KL and aggregation works.
        old_logp: ``(B, T)`` log-probs of the sampling policy, or ``None`` (on-policy: ratio 1, gradient flows).
        ref_logp: ``(B, T)`` reference log-probs; required when ``config.beta > 0``.
        sampling_logp: ``(B, T)`` the sampler's own log-probs (vLLM's), as in :func:`~drgrpo.policy_loss`.
        bias: ``(V,)`` output-layer bias, or ``None``.
        temperature: the sampling temperature ``tau > 0``; logits are divided by it.
        chunk_size: real tokens per chunk (extra memory ``~ chunk_size * V`` floats);
            ``None`` uses :func:`default_chunk_size`. Sequence-level configs chunk by whole rows.
        normalizer: a :class:`~drgrpo.normalizer.StepNormalizer` for split-invariant aggregation.
        compute_entropy: also return each real token's entropy of ``softmax((h W^T + b) / temperature)``
            (TRL's ``entropy`` metric), computed from the chunks of the same pass: no extra product.
        entropy_threshold: the entropy mask's threshold (``config.top_entropy_quantile < 1``), as in
            :func:`~drgrpo.policy_loss`; ``None`` computes it from this call's entropies (a first pass over the
            chunks: four products instead of three). The mask and the bonus (``config.entropy_coef``) use the
            entropies of this pass; their gradient is folded into the same products.
        validate: check the data as :func:`~drgrpo.policy_loss` does: no NaN or inf in the rows of ``hidden`` at
            real tokens, in ``weight`` and ``bias``, in ``advantages`` and in ``old_logp``/``ref_logp`` at real
            tokens; ``target_ids`` in ``[0, V)`` and ``mask`` 0/1 at real tokens. One pass over ``hidden`` and
            ``weight`` for their min and max (no ``(N, V)`` or ``(V, H)`` temporary) and a device sync;
            ``False`` skips it. Types, shapes and devices are checked either way.

    Returns:
        :class:`~drgrpo.loss.LossOutput`: ``loss`` (scalar, float32 for half-precision inputs; backward gives
        gradients for ``hidden``, ``weight`` and ``bias``), ``metrics`` as :func:`~drgrpo.policy_loss`,
        ``logp`` ``(B, T)`` detached per-token log-probs (0 on padding), and with ``compute_entropy`` the
        detached per-token entropies ``entropy`` ``(B, T)`` (0 on padding; float32 for half-precision inputs).
    """
    _check_inputs(hidden, weight, target_ids, mask, bias, temperature, chunk_size, values=validate)
    b, t, _ = hidden.shape
    adt = compute_dtype(weight.dtype)
    logp_shape = torch.zeros(b, t, dtype=adt, device=hidden.device)  # stands for logp in the checks of the rest
    validate_inputs(
        logp_shape, old_logp, advantages, mask, config, ref_logp, values=validate, sampling_logp=sampling_logp
    )
    check_entropy_inputs(config, logp_shape, logp_shape, entropy_threshold, normalizer)
    if config.surrogate in BATCH_COUPLED:
        raise ValueError(
            f"config.surrogate {config.surrogate!r} reads a covariance over every token of the call, which the fused "
            "path, evaluating chunks of rows, does not have: use drgrpo.policy_loss"
        )
    if validate:
        check_finite_rows("hidden", hidden, mask)
        check_finite_large("weight", weight)
        if bias is not None:
            check_finite_large("bias", bias)
    grad_on = torch.is_grad_enabled()
    problem = _Problem(
        target_ids=target_ids.reshape(-1).long(),
        mask=mask,
        advantages=advantages,
        config=config,
        old_logp=None if old_logp is None else old_logp.detach(),
        ref_logp=None if ref_logp is None else ref_logp.detach(),
        sampling_logp=None if sampling_logp is None else sampling_logp.detach(),
        normalizer=normalizer,
        temperature=float(temperature),
        chunk_size=int(chunk_size) if chunk_size is not None else default_chunk_size(weight.shape[0]),
        need_dh=grad_on and hidden.requires_grad,
        need_dw=grad_on and weight.requires_grad,
        need_db=grad_on and bias is not None and bias.requires_grad,
        compute_entropy=bool(compute_entropy) or config.top_entropy_quantile < 1 or config.entropy_coef != 0,
        entropy_threshold=entropy_threshold,
    )
    loss = _FusedLinearPolicyLoss.apply(hidden, weight, bias, problem)
    assert problem.metrics is not None
    return LossOutput(loss=loss, metrics=problem.metrics, logp=problem.logp, entropy=problem.entropy)


@torch.no_grad()
def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[target_ids]`` ``(B, T)``, chunked, no gradient.

    For ``old_logp`` / ``ref_logp`` from a frozen model without the ``(N, V)`` logits. Positions where
    ``mask`` is 0 are not computed (0 in the result); ``mask=None`` computes every position.
    """
    if mask is None and isinstance(hidden, Tensor) and hidden.dim() == 3:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    _check_inputs(hidden, weight, target_ids, mask, bias, temperature, chunk_size)
    assert mask is not None
    b, t = hidden.shape[:2]
    rows = int(chunk_size) if chunk_size is not None else default_chunk_size(weight.shape[0])
    h2d = hidden.reshape(b * t, -1)
    pos_all = mask.bool().reshape(-1).nonzero().squeeze(1)
    chunker = _Chunker(h2d, weight, bias, target_ids.reshape(-1).long(), float(temperature), min(rows, pos_all.numel()))
    logp = torch.zeros(b * t, dtype=chunker.adt, device=hidden.device)
    for s in range(0, pos_all.numel(), rows):
        pos = pos_all[s : s + rows]
        z, _, y_c = chunker.log_softmax(pos)
        logp[pos] = z.gather(1, y_c[:, None]).squeeze(1)
    return logp.reshape(b, t)


class FusedPolicyLoss(nn.Module):
    """:func:`fused_policy_loss` as a module for trainers that own the output layer.

    It holds the loss configuration, the chunk size and the temperature, and reads the weight (and bias)
    of the ``nn.Linear`` output layer it is given at each call, so the layer's parameters get the gradients::

        loss_fn = FusedPolicyLoss(LossConfig.preset("dr_grpo", max_completion_length=L))
        hidden = model.model(input_ids).last_hidden_state[:, prompt_len - 1 : -1]   # (B, T, H)
        out = loss_fn(hidden, model.lm_head, completion_ids, completion_mask, advantages, old_logp=old_logp)
        out.loss.backward()
    """

    def __init__(
        self, config: LossConfig, *, temperature: float = 1.0, chunk_size: int | None = None, validate: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(config, LossConfig):
            raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
        _check_scalars(temperature, chunk_size)
        self.config = config
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.validate = validate  # the data checks of fused_policy_loss (a device sync per call)

    def forward(
        self,
        hidden: Tensor,
        lm_head: nn.Linear | Tensor,
        target_ids: Tensor,
        mask: Tensor,
        advantages: Tensor,
        *,
        old_logp: Tensor | None = None,
        ref_logp: Tensor | None = None,
        sampling_logp: Tensor | None = None,
        normalizer: StepNormalizer | None = None,
    ) -> LossOutput:
        """``lm_head``: the output ``nn.Linear`` (its bias is used if it has one) or a ``(V, H)`` weight."""
        if isinstance(lm_head, nn.Linear):
            weight, bias = lm_head.weight, lm_head.bias
        elif isinstance(lm_head, Tensor):
            weight, bias = lm_head, None
        else:
            raise TypeError(f"lm_head must be an nn.Linear or a (V, H) weight tensor, got {type(lm_head).__name__}")
        return fused_policy_loss(
            hidden,
            weight,
            target_ids,
            mask,
            advantages,
            self.config,
            old_logp=old_logp,
            ref_logp=ref_logp,
            sampling_logp=sampling_logp,
            bias=bias,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            normalizer=normalizer,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return f"config={self.config.name or 'custom'}, temperature={self.temperature}, chunk_size={self.chunk_size}"


# --------------------------------------------------------------------------- input checks


def _check_scalars(temperature: float, chunk_size: int | None) -> None:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (real tokens per chunk), got {chunk_size}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _check_inputs(
    hidden: Any,
    weight: Any,
    target_ids: Any,
    mask: Any,
    bias: Any,
    temperature: float,
    chunk_size: int | None,
    values: bool = True,
) -> None:
    """Errors that name the argument, what it got and what was expected (the loss inputs: ``validate_inputs``).

    ``values``: also check that ``target_ids`` are in ``[0, V)`` at real tokens (reads them: a device sync)."""
    _check_scalars(temperature, chunk_size)
    for name, x in (("hidden", hidden), ("weight", weight), ("target_ids", target_ids), ("mask", mask)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) like nn.Linear(H, V).weight, got shape {tuple(weight.shape)}")
    b, t, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        hint = " (did you pass weight.T?)" if weight.shape[0] == h else ""
        raise ValueError(
            f"hidden size mismatch: hidden is (B, T, H) = {tuple(hidden.shape)} but weight is (V, H) = "
            f"{tuple(weight.shape)}; expected weight.shape[1] == {h}{hint}"
        )
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}: the products need one dtype; cast one, "
            f"e.g. hidden.to(weight.dtype) (bf16 weights: keep hidden in bf16, the softmax runs in float32)"
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        check_shape("bias", bias, (v,), "(V,)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}; cast the bias to {weight.dtype}")
    for name, x in (("weight", weight), ("target_ids", target_ids), ("mask", mask), ("bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}; move them to one device")
    check_shape("target_ids", target_ids, (b, t), "(B, T)")
    if target_ids.is_floating_point() or target_ids.dtype == torch.bool or target_ids.is_complex():
        raise TypeError(f"target_ids must be an integer tensor, got dtype {target_ids.dtype}")
    check_shape("mask", mask, (b, t), "(B, T)")  # advantages: checked by validate_inputs
    if not values:
        return
    bad = ((target_ids < 0) | (target_ids >= v)) & mask.bool()
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise ValueError(
            f"target_ids must be in [0, V) = [0, {v}) where mask is 1, got {int(target_ids[first])} at position {first}"
        )
