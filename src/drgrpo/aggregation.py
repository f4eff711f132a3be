r"""Aggregation: the one place where the denominators of GRPO, DAPO and Dr. GRPO are chosen.

Every aggregation is linear in the per-token loss ``l`` (B, T)::

    loss = sum_{i,t} w_{i,t} * l_{i,t}

with weights ``w`` that depend only on the mask, the counts and the constant ``L``:

=========================  ======================================  ==========================
aggregation                w_{i,t} (m = mask)                      used by
=========================  ======================================  ==========================
token-mean                 m / N_tok                               DAPO, BNPO
seq-mean-token-mean        m / (N_seq * |o_i|)                     GRPO: length-biased
seq-mean-token-sum-norm    m / (N_seq * L)                         Dr. GRPO (arXiv 2503.20783), verl 0.9
seq-mean-token-sum         m / N_seq                               verl
token-sum                  m                                       verl
token-sum-norm             m / L  (L = padded width T if unset)    verl <= 0.7 "seq-mean-token-sum-norm"
=========================  ======================================  ==========================

``N_tok`` and ``N_seq`` are the batch's real-token and completion counts, or, with a
:class:`~drgrpo.normalizer.StepNormalizer`, the whole optimizer step's counts across micro-batches
and processes; then ``w`` is also multiplied by the world size to undo DDP's gradient averaging.
"""

from __future__ import annotations

from torch import Tensor

from drgrpo.config import LossConfig, check_constant_length
from drgrpo.normalizer import StepNormalizer, check_step_normalizable


def token_weights(mask: Tensor, config: LossConfig, normalizer: StepNormalizer | None = None) -> Tensor:
    """Aggregation weights ``(B, T)`` in ``mask``'s floating dtype (float32 for bool/int masks).

    Args:
        mask: ``(B, T)``, 1 on real completion tokens, 0 on padding.
        config: its ``aggregation`` and ``max_completion_length`` (the constant L) are used.
        normalizer: global counts for one optimizer step; ``None`` uses this batch's own counts.
    """
    m = mask if mask.is_floating_point() else mask.float()
    if normalizer is None:
        num_tokens: Tensor | float = m.sum().clamp_min(1)
        num_sequences: Tensor | float = max(m.shape[0], 1)
        length = config.max_completion_length
        scale = 1.0
    else:
        length = normalizer.max_completion_length or config.max_completion_length
        check_step_normalizable(config, length)
        num_tokens = normalizer.num_tokens
        num_sequences = normalizer.num_sequences
        scale = float(normalizer.world_size)

    agg = config.effective_aggregation
    if agg == "token-mean":
        w = m / num_tokens
    elif agg == "seq-mean-token-mean":
        w = m / (m.sum(-1, keepdim=True).clamp_min(1) * num_sequences)
    elif agg == "seq-mean-token-sum-norm":
        check_constant_length(agg, length)
        assert length is not None
        w = m / (num_sequences * length)
    elif agg == "seq-mean-token-sum":
        w = m / num_sequences
    elif agg == "token-sum":
        w = m
    elif agg == "token-sum-norm":  # verl <= 0.7's "seq-mean-token-sum-norm": no 1/N_seq; L defaults to the padded width
        w = m / (length if length is not None else max(m.shape[-1], 1))
    else:  # LossConfig validates this; kept for type checkers
        raise ValueError(f"unknown aggregation {agg!r}")
    return w * scale if scale != 1.0 else w
