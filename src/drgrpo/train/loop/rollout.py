r"""Rollouts: G sampled completions per prompt with Hugging Face ``generate``, and their log-probs.

Shapes (B completions = prompts x G, P prompt tokens, T completion tokens)::

    prompt_ids        (B, P)   left-padded, so every completion starts at column P
    completion_ids    (B, T)   right-padded after the first end-of-sequence token
    completion_mask   (B, T)   1 on real completion tokens, the end-of-sequence token included
    truncated         (B,)     True where no end-of-sequence token came within max_new_tokens

Log-probs are those of ``softmax(logits / temperature)``: the distribution the tokens were
sampled from (``temperature=1`` is the model's own distribution).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from drgrpo.fused import chunked_logprobs


@dataclass
class Rollout:
    """One batch of sampled completions (rows grouped in contiguous blocks of G per prompt)."""

    prompt_ids: Tensor  # (B, P)
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, T)
    completion_mask: Tensor  # (B, T)
    texts: list[str]  # B decoded completions (special tokens removed)
    truncated: Tensor  # (B,) bool: stopped by the token budget, not by an end-of-sequence token

    @property
    def input_ids(self) -> Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # (B, P + T)
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> Tensor:  # (B,) real completion tokens per row
        return self.completion_mask.sum(-1)

    def rows(self, idx: slice) -> Rollout:
        return Rollout(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
            self.texts[idx],
            self.truncated[idx],
        )


def prompt_texts(prompts: Sequence[str | list[dict[str, Any]]], tokenizer: Any) -> list[str]:
    """Prompt strings; chat messages (or plain strings, when the tokenizer has a chat template) get the template."""
    out = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        elif isinstance(p, str):
            out.append(p)
        else:
            raise ValueError("a prompt given as chat messages needs a tokenizer with a chat template")
    return out


def _is_eos(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:  # (B, T) bool
    return torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))


def truncated_rows(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """``(B,)`` bool: rows with no end-of-sequence token, i.e. cut off by the token budget."""
    return ~_is_eos(completion_ids, eos_token_ids).any(-1)


def completion_mask(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """``(B, T)`` mask: 1 up to and including the first end-of-sequence token of each row."""
    is_eos = _is_eos(completion_ids, eos_token_ids)
    # tokens strictly after the first EOS: cumulative count of EOS before them is >= 1
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chat: bool | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt (greedy when ``temperature == 0``).

    ``prompts`` are already templated strings (see :func:`prompt_texts`); rows come out grouped:
    prompt 0's G completions first, then prompt 1's, and so on. ``chat`` (default: whether the tokenizer
    has a chat template) leaves out the tokenizer's special tokens, which the template already holds.
    """
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not chat)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0).to(device)  # (B, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0).to(device)  # (B, P)
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]  # (B, T), T <= max_new_tokens
    mask = completion_mask(completion_ids, eos_ids)  # (B, T)
    truncated = truncated_rows(completion_ids, eos_ids)  # (B,)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, texts, truncated)


def _forward(model: Any, batch: Rollout, **kwargs: Any) -> Any:
    input_ids = batch.input_ids  # (B, P + T)
    attn = batch.attention_mask  # (B, P + T)
    # positions as generate() assigns them: count real tokens, so left padding does not shift them
    position_ids = (attn.long().cumsum(-1) - 1).clamp_min(0)  # (B, P + T)
    return model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False, **kwargs)


def token_logp(model: Any, batch: Rollout, temperature: float = 1.0) -> Tensor:
    """Log-probs ``(B, T)`` of the completion tokens under ``model`` at ``temperature``.

    Padding positions hold arbitrary finite values; multiply by ``completion_mask``.
    """
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    logits = _forward(model, batch).logits[:, P - 1 : P - 1 + T].float() / temperature  # (B, T, V): t predicts t+1
    return torch.log_softmax(logits, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)


def completion_hidden(model: Any, batch: Rollout) -> Tensor:
    """The final (normed) hidden states ``(B, T, H)`` that predict the completion tokens.

    For the fused loss, which applies the output layer itself; the full logits are never built
    (``logits_to_keep=1``), and the call goes through ``model`` (e.g. DDP) so hooks still run.
    """
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    out = _forward(model, batch, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, P - 1 : P - 1 + T]  # (B, T, H)


def output_layer(model: Any) -> tuple[Tensor, Tensor | None]:
    """The output layer's weight ``(V, H)`` and bias ``(V,)`` or None (the weight is often tied to the embedding)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


@torch.no_grad()
def completion_logp(model: Any, batch: Rollout, temperature: float, fused: bool) -> Tensor:
    """Log-probs ``(B, T)`` of the completion tokens without gradient (old or reference log-probs).

    ``fused=True`` goes through the last hidden states and :func:`drgrpo.chunked_logprobs`, so no
    ``(B, T, V)`` logits are ever built (0 on padding); otherwise through the full logits.
    """
    if not fused:
        return token_logp(model, batch, temperature)
    weight, bias = output_layer(model)
    hidden = completion_hidden(model, batch)  # (B, T, H)
    return chunked_logprobs(
        hidden, weight, batch.completion_ids, batch.completion_mask, bias=bias, temperature=temperature
    )
