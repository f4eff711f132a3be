r"""A tiny Hugging Face causal LM and tokenizer built locally: no download, ever.

The default run takes the same code path as a real model: the tokenizer is a
``transformers.PreTrainedTokenizerFast`` wrapping a ``tokenizers`` word-level vocabulary,
and the model is a ``transformers.LlamaForCausalLM`` built from a config. Both are saved
with ``save_pretrained`` and loaded back with the ``Auto*`` classes like any local model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from drgrpo.train.loop.task import WORK_TOKEN
from drgrpo.train.train_config import TinyModelConfig

if TYPE_CHECKING:  # imported on use: importing transformers' Llama takes about 3 s of CPU
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, UNK, *"0123456789", "+", "-", "=", WORK_TOKEN)
"""The whole vocabulary of the built-in task (V = 18)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace-separated word-level tokenizer over :data:`VOCAB`.

    Encoding adds nothing (prompts are plain text); ``<bos>`` is unused by the task,
    ``<eos>`` ends a completion, ``<pad>`` pads a batch.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    tok.padding_side = "left"  # generation appends on the right
    return tok


def build_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of the given shape (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
