"""The process group of a training job: joining it, and who this process is.

A job runs under torchrun (``WORLD_SIZE`` > 1) or as one process: NCCL on GPUs, gloo on the CPU. One process
gets a group of its own when it trains in 16 bits, so that FSDP2's mixed precision applies to it as to N
processes; in fp32 it needs none. A group that already exists (tests spawn their own) is used as it is.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

GROUP_TIMEOUT = timedelta(minutes=30)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(*, even_alone: bool = False) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or with ``even_alone`` make a group of this
    one process (an in-memory store, no network); True when this call created a group."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if is_distributed() or (ranks <= 1 and not even_alone):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if ranks > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=GROUP_TIMEOUT)
    return True


def host_group() -> dist.ProcessGroup | None:
    """A group for small values that live on the host (gloo), so that agreeing on them never waits for the GPU;
    None without a group. Collective: every rank calls it."""
    if not is_distributed():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")
