"""A local Hugging Face model directory for the examples: a tiny random Llama and its tokenizer, no download.

    python examples/make_model.py runs/my-model

The model has drgrpo's built-in shape (a 2-layer LlamaForCausalLM, H = 64), randomly initialised; the tokenizer is
the built-in word-level one (digits, '+', '-', '=', the working token '.', and <pad>, <bos>, <eos>, <unk>). Both are
saved with save_pretrained, like any model you bring: `drgrpo train --model runs/my-model` loads them with
AutoModelForCausalLM and AutoTokenizer. A random model starts at accuracy 0 on examples/data; the examples show the
file formats and the flags, not a result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drgrpo.train.loop.tiny import TinyModelConfig, build_model, build_tokenizer


def make_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Llama and its tokenizer to ``out_dir`` (created); returns it as a Path."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_model(TinyModelConfig(), tokenizer, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the model and tokenizer to (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    args = parser.parse_args()
    print(make_model(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
