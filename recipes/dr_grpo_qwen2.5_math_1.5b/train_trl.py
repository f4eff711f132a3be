"""The TRL launcher of the recipe: ``drgrpo.integrations.trl``'s command line with the paper's two rules added.

    accelerate launch --config_file recipes/dr_grpo_qwen2.5_math_1.5b/accelerate_zero2.yaml \\
        recipes/dr_grpo_qwen2.5_math_1.5b/train_trl.py --config recipes/dr_grpo_qwen2.5_math_1.5b/trl.yaml

It trains with :class:`PaperTrainer`, :class:`drgrpo.integrations.trl.DrGRPOTrainer` where a truncated completion
gets reward 0 from every reward function and evaluation decodes greedily (``paper_rules``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # paper_rules, beside this file

import torch
from paper_rules import greedy_generation, is_truncated

from drgrpo.integrations.trl import DrGRPOTrainer
from drgrpo.integrations.trl_cli import main as cli_main


class PaperTrainer(DrGRPOTrainer):
    """``DrGRPOTrainer`` with the paper's reward for truncated completions and its greedy evaluation."""

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        """TRL's (N, F) rewards (N completions, F reward functions), 0 in every column of a truncated completion."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        ids = [list(map(int, c)) for c in completion_ids_list]
        end = set(self.eos_token_ids)
        cut = [is_truncated(c, self.max_completion_length, end) for c in ids]
        keep = torch.tensor([0.0 if c else 1.0 for c in cut], device=rewards.device)
        keep = self.accelerator.gather(keep)  # the rows of ``rewards`` are every process's completions, in order
        return torch.where(keep[:, None] > 0, rewards, torch.zeros_like(rewards))

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's evaluation, generating with temperature 0."""
        with greedy_generation(self):
            return super().evaluate(*args, **kwargs)


if __name__ == "__main__":
    raise SystemExit(cli_main(None, trainer_cls=PaperTrainer, prog="train_trl.py"))
