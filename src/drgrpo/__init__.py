"""drgrpo: the Dr. GRPO objective and the GRPO family of policy losses, exact, fused and split-invariant.

Notation used throughout: B completions, T completion tokens, G completions per prompt (group),
N = B*T tokens, V vocabulary size, H hidden size, L the constant length normaliser of Dr. GRPO.
"""

# drgrpo.presets and drgrpo.peers register the named presets when imported (the registry is in drgrpo.config),
# drgrpo.surrogates the surrogates (drgrpo.registry).
from drgrpo import peers, presets, surrogates  # noqa: F401
from drgrpo.advantages import group_advantages
from drgrpo.aggregation import token_weights
from drgrpo.config import LossConfig, preset_names, register_preset
from drgrpo.distributed import global_group_advantages
from drgrpo.fused import FusedPolicyLoss, chunked_logprobs, fused_policy_loss
from drgrpo.kl import kl_penalty
from drgrpo.loss import LossOutput, PerTokenLoss, per_token_loss, policy_loss
from drgrpo.normalizer import StepNormalizer
from drgrpo.spec import dr_grpo_objective, dr_grpo_paper_objective

__version__ = "0.1.0"

__all__ = [
    "FusedPolicyLoss",
    "LossConfig",
    "LossOutput",
    "PerTokenLoss",
    "StepNormalizer",
    "__version__",
    "chunked_logprobs",
    "dr_grpo_objective",
    "dr_grpo_paper_objective",
    "fused_policy_loss",
    "global_group_advantages",
    "group_advantages",
    "kl_penalty",
    "per_token_loss",
    "policy_loss",
    "preset_names",
    "register_preset",
    "token_weights",
]
