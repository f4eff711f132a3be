"""The verl side of the recipe's reward: verl's MATH grader for every benchmark, and 0 for a truncated completion.

``verl.sh`` names this file twice: ``reward.custom_reward_function`` (:func:`compute_score`: verl's rule grader
for MATH, ``verl.utils.reward_score.math_reward``, whatever the ``data_source``, so that each evaluation benchmark
keeps its own name in verl's validation metrics) and ``reward.reward_manager`` (:class:`TruncatedZeroRewardManager`:
verl's naive reward manager, with reward 0 for a completion that filled the response budget without an end token,
the rule of ``paper_rules.is_truncated``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # paper_rules, beside this file

from paper_rules import is_truncated
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
from verl.utils.reward_score import math_reward


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None, **_: Any) -> float:
    """1.0 if the last boxed answer of ``solution_str`` equals ``ground_truth`` (verl's MATH grader), else 0."""
    return float(math_reward.compute_score(solution_str, ground_truth))


def end_ids(tokenizer: Any) -> set[int]:
    """The tokens that end a completion: the tokenizer's EOS and, in a Qwen chat vocabulary, ``<|im_end|>``."""
    ids = {tokenizer.eos_token_id} - {None}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


class TruncatedZeroRewardManager(NaiveRewardManager):
    """verl's naive reward manager; a completion that filled the response budget without an end token scores 0."""

    async def run_single(self, data: Any) -> dict:
        result = await super().run_single(data)
        item = data[-1:][0]
        responses = item.batch["responses"]
        budget = responses.shape[-1]  # verl pads every response to data.max_response_length
        length = int(item.batch["attention_mask"][-budget:].sum())
        if is_truncated(responses[:length].tolist(), budget, end_ids(self.tokenizer)):
            result["reward_score"] = 0.0
            result["reward_extra_info"]["truncated"] = 1.0
        else:
            result["reward_extra_info"]["truncated"] = 0.0
        return dict(result)
