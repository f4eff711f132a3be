"""The processes of a run: :func:`init_processes` joins them (the process group under ``torchrun``),
:class:`Processes` says where this one stands, :func:`shutdown` ends the group it started.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from drgrpo.distributed import distributed_world_size, is_distributed


@dataclass(frozen=True)
class Processes:
    """This process's place in a (possibly single-process) run, from :func:`init_processes`."""

    rank: int
    """0 .. world - 1; rank 0 writes logs and checkpoints."""
    world: int
    """Number of processes (1 without ``torchrun``)."""
    device: torch.device
    """This process's device (``cuda:LOCAL_RANK`` for CUDA under ``torchrun``)."""
    owns_group: bool
    """True when :func:`init_processes` started the process group (and :func:`shutdown` ends it)."""


def init_processes(device: str) -> Processes:
    """Join the run's processes: start the default process group when launched by ``torchrun``
    (``WORLD_SIZE`` > 1; gloo on CPU, nccl on CUDA) unless one is already initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns_group = world > 1 and not is_distributed()
    if owns_group:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = torch.distributed.get_rank() if is_distributed() else 0
    world = distributed_world_size()
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return Processes(rank, world, dev, owns_group)


def shutdown(processes: Processes) -> None:
    """End the process group if :func:`init_processes` started it (call after freeing DDP wrappers).

    DDP's reducer holds the group and sits in reference cycles: it is collected here, not at interpreter
    exit, where gloo's threads releasing tensors can abort a finished run.
    """
    if processes.owns_group and is_distributed():
        gc.collect()
        torch.distributed.destroy_process_group()
