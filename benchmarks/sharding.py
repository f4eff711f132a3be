"""FSDP2 and DeepSpeed ZeRO-3 in ``trl_harness``'s gloo ranks, on a CPU: how a run is sharded, and what it records.

**FSDP2.** transformers shards the model at load time: ``from_pretrained(distributed_config=DistributedConfig(
fsdp_size=P, fsdp_plan=...))`` applies torch's ``fully_shard`` to every decoder layer, to the plan's modules
(Llama's plan keeps ``lm_head`` gathered after its forward; ``{"lm_head": "free_full_weight"}`` frees it) and to
the root, so every parameter is a ``DTensor`` holding 1/P of its rows. The Trainer then leaves placement and
gradient reduction to the model (accelerate adds no DDP wrapper), and generation runs with ``synced_gpus``.
accelerate's own FSDP plugin cannot be used for this on a CPU: ``use_cpu`` makes the run ``MULTI_CPU`` (plain
DDP), and accelerate 1.15 switches to FSDP only from GPU-like distributed types.

**ZeRO-3.** accelerate's DeepSpeed plugin (``GRPOConfig(deepspeed={... "stage": 3 ...})``) with DeepSpeed's CPU
accelerator, which communicates over gloo. With ``use_cpu=False`` and no GPU, accelerate 1.15 finds no backend
and sets up *one* process, and DeepSpeed then refuses the batch sizes ("train_batch_size is not equal to
micro_batch_per_gpu * gradient_acc_step * world_size 4 != 2 * 2 * 2"). So the rank builds accelerate's state
itself, ``PartialState(backend="gloo")`` with the DeepSpeed flag, and the Trainer adopts it
(``accelerator_config={"use_configured_state": True}``). ZeRO-3 keeps gradients in its own partitioned buffers
(``param.grad`` is None) and steps the optimizer inside the last micro-step's backward, so the full gradient
of a step is read at the start of ``DeepSpeedEngine.step`` (``deepspeed.utils.safe_get_full_grad``).
DeepSpeed's CPU communication backend compiles a shared-memory all-reduce (used only for inference) on
first use, minutes on 2 cores with a C++ compiler; the ranks mark it unavailable, and gloo does the work.

For either, a rank records in what state the adapter found ``lm_head``'s weight at each loss call (sharded
``DTensor``, ZeRO-3 partition, or full), and how the model's parameters are laid out, so a test can check the
run really was sharded where it matters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ZERO3 = {
    # no persistent parameters and no prefetching: even the tiny model's parameters are partitioned, and each is
    # gathered only when used (lm_head's, for the fused loss, when the loss reads it)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
    "train_micro_batch_size_per_gpu": "auto",  # "auto": the Trainer fills them in from GRPOConfig
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


@dataclass
class Sharding:
    """What a rank needs for one sharded job, and what it records."""

    model: Any = None  # the FSDP2-sharded model to train; None: TRL loads the model directory
    args: dict[str, Any] = field(default_factory=dict)  # GRPOConfig fields the sharding needs
    head: list[str] = field(default_factory=list)  # per loss call: the state lm_head's weight was found in
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # ZeRO-3: each step's full gradient


_CURRENT: Sharding | None = None  # the running job's (the patches below record into it)


def setup(job: dict[str, Any], model_dir: Path, world_size: int) -> Sharding | None:
    """Pop the job's ``fsdp2`` (a plan, ``{}`` for the model's own) or ``zero3`` key and set the run up for it."""
    global _CURRENT
    plan, zero3 = job.pop("fsdp2", None), job.pop("zero3", False)
    _CURRENT = None if plan is None and not zero3 else Sharding()
    if _CURRENT is None:
        return None
    _spy_on_the_head()
    if plan is not None:
        from transformers import AutoModelForCausalLM, DistributedConfig

        config = DistributedConfig(fsdp_size=world_size, fsdp_plan=plan or None)
        _CURRENT.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, distributed_config=config)
    else:
        _use_deepspeed()
        _CURRENT.args = {"use_cpu": False, "deepspeed": ZERO3, "accelerator_config": {"use_configured_state": True}}
    return _CURRENT


def layout(model: Any) -> dict[str, int]:
    """How many parameters there are, how many are sharded DTensors, how many ZeRO-3 partitions (of < all rows)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    dtensor = sum(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in params)
    zero3 = sum(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in params)
    return {"params": len(params), "dtensor": dtensor, "zero3": zero3}


def _use_deepspeed() -> None:
    """accelerate's state with DeepSpeed over gloo; every optimizer step's full gradient recorded (once per process)."""
    import deepspeed.ops
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no compiled op: gloo's all-reduce
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=True)  # each job's Trainer adds its own DeepSpeed plugin
    PartialState(backend="gloo")
    if getattr(DeepSpeedEngine.step, "_records", False):
        return
    step = DeepSpeedEngine.step

    def recording_step(engine: Any, *args: Any, **kwargs: Any) -> Any:
        if _CURRENT is not None and engine.is_gradient_accumulation_boundary():  # every rank takes part in the gathers
            named = engine.module.named_parameters()
            _CURRENT.grads.append({n: safe_get_full_grad(p).detach().clone() for n, p in named})
        return step(engine, *args, **kwargs)

    recording_step._records = True  # type: ignore[attr-defined]
    DeepSpeedEngine.step = recording_step


def _spy_on_the_head() -> None:
    """Record the state of ``lm_head``'s weight each time the adapter's loss looks at it (both paths do)."""
    import drgrpo.integrations.trl as adapter

    if getattr(adapter._unshard_fsdp2_head, "_records", False):
        return
    unshard = adapter._unshard_fsdp2_head

    def spy(causal_lm: Any, lm_head: Any) -> None:
        if _CURRENT is not None:  # read past ZeRO-3's parameter dict, which gathers a parameter read in a forward
            _CURRENT.head.append(_state(dict.__getitem__(lm_head._parameters, "weight")))
        unshard(causal_lm, lm_head)

    spy._records = True  # type: ignore[attr-defined]
    adapter._unshard_fsdp2_head = spy


def _state(weight: torch.Tensor) -> str:
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return f"DTensor {tuple(weight.to_local().shape)} of {tuple(weight.shape)}"
    if hasattr(weight, "ds_id") and weight.numel() == 0:
        return f"ZeRO-3 partition {weight.ds_tensor.numel()} of {weight.ds_numel}"
    return "full"
