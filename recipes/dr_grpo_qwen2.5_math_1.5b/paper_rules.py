"""The paper's two rules that neither TRL nor verl applies by itself, in one place for both launchers.

- **Truncated completions get reward 0.** A completion that used the whole generation budget without emitting an
  end token was cut off; the authors' framework (sail-sg/oat, as this recipe's README cites it) scores it 0 whatever
  it wrote, where TRL and verl would grade the text it left.
- **Evaluation is greedy** (temperature 0): the authors evaluate every 16 rollouts at ``--eval_temperature 0``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def is_truncated(completion_ids: Sequence[int], budget: int, end_ids: Collection[int]) -> bool:
    """Whether a completion was cut off: it holds ``budget`` tokens (or more) and its last is not an end token.

    ``completion_ids`` are the generated tokens up to and including the end token (TRL's ``completion_ids`` and
    verl's valid response tokens both are); ``end_ids`` the tokens that stop generation (the tokenizer's EOS and,
    for Qwen's chat template, ``<|im_end|>``). A completion shorter than the budget stopped on its own.
    """
    if budget < 1:
        raise ValueError(f"budget: got {budget}, expected the generation budget, a positive number of tokens")
    return len(completion_ids) >= budget and (len(completion_ids) == 0 or completion_ids[-1] not in end_ids)


def zero_truncated(
    rewards: Sequence[float], completion_ids: Sequence[Sequence[int]], budget: int, end_ids: Collection[int]
) -> list[float]:
    """``rewards`` with 0 for every truncated completion (:func:`is_truncated`), the others unchanged."""
    if len(rewards) != len(completion_ids):
        raise ValueError(f"rewards: got {len(rewards)}, expected one per completion ({len(completion_ids)})")
    return [0.0 if is_truncated(ids, budget, end_ids) else float(r) for r, ids in zip(rewards, completion_ids)]


@contextmanager
def greedy_generation(trainer: Any) -> Iterator[None]:
    """Within the block, TRL's ``GRPOTrainer`` generates greedily (temperature 0); restored after.

    TRL 1.16 samples evaluation completions with the training temperature and has no setting of its own for
    evaluation. Only generation changes: with transformers, ``generation_config.do_sample`` is set False (argmax
    decoding); with vLLM, the generator's sampling temperature is set 0 (vLLM's greedy). ``trainer.temperature``,
    which also scales the logits of the log-probabilities, is left alone.
    """
    saved: list[tuple[Any, str, Any]] = []
    config = getattr(trainer, "generation_config", None)
    if config is not None:
        saved.append((config, "do_sample", config.do_sample))
        config.do_sample = False
    vllm = getattr(trainer, "vllm_generation", None)
    if vllm is not None:
        saved.append((vllm, "temperature", vllm.temperature))
        vllm.temperature = 0.0
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
