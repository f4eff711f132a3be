r"""A tiny Hugging Face causal LM and tokenizer built locally: no download, ever.

The default run takes the same code path as a real model: the tokenizer is a
``transformers.PreTrainedTokenizerFast`` wrapping a ``tokenizers`` word-level vocabulary,
and the model is a ``transformers.LlamaForCausalLM`` built from a config. Both are saved
with ``save_pretrained`` and loaded back with the ``Auto*`` classes like any local model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from drgrpo.field_error import FieldError
from drgrpo.train.loop.task import WORK_TOKEN

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, UNK, *"0123456789", "+", "-", "=", WORK_TOKEN)
"""The whole vocabulary of the built-in task (V = 18)."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the built-in Llama-style model."""

    hidden_size: int = 64
    """Width H of the residual stream."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block (each of width H / heads)."""
    intermediate_size: int = 256
    """Width of the SwiGLU MLP."""
    max_positions: int = 64
    """Longest sequence the model accepts, prompt and completion together, in tokens."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(TinyModelConfig, name, f"{name} must be a positive integer, got {value!r}")
        # each head takes H / heads dimensions, and rotary position embeddings turn them in pairs
        if self.hidden_size % 2:
            raise FieldError(
                TinyModelConfig,
                "hidden_size",
                f"hidden_size must be even (a head's width must be, for its rotary position embeddings), got "
                f"{self.hidden_size}",
            )
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            counts = [str(n) for n in range(1, self.hidden_size) if self.hidden_size % (2 * n) == 0]
            raise FieldError(
                TinyModelConfig,
                ("num_heads", "hidden_size"),
                f"num_heads {self.num_heads} does not split hidden_size {self.hidden_size} into heads of an even "
                f"width (rotary position embeddings turn a head's dimensions in pairs); num_heads can be "
                f"{', '.join(counts[:-1]) + ' or ' if len(counts) > 1 else ''}{counts[-1]}",
            )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace-separated word-level tokenizer over :data:`VOCAB`.

    Encoding adds nothing (prompts are plain text); ``<bos>`` is unused by the task,
    ``<eos>`` ends a completion, ``<pad>`` pads a batch.
    """
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    tok.padding_side = "left"  # generation appends on the right
    return tok


def build_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of the given shape (float32)."""
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
