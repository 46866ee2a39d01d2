"""Process group and compile: torchrun's environment read once, a few collectives, per-block torch.compile.

Processes are always started by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment); a plain
``python -m`` run is one process without a process group (FSDP2 and DeepSpeed get a group of one).
The engines that wrap the model (DDP, FSDP2, DeepSpeed) are in ``cptflow.train.engines`` and
``cptflow.train.fsdp``; the attention kernel choice in ``cptflow.train.attention``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


log = logging.getLogger("cptflow.train.parallel")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank; 0 logs, writes outputs and checkpoints shared files
    local_rank: int  # rank on this node: picks the GPU
    world_size: int  # data-parallel processes
    device: torch.device
    backend: str | None  # None: single process, no process group


def init_distributed(engine: str = "ddp") -> DistInfo:
    """Read torchrun's environment; start a process group when there is more than one process.

    DeepSpeed always gets a group (its engine needs one even for one process), started through
    ``deepspeed.init_distributed`` so that DeepSpeed's own comm layer knows the world size too; FSDP2
    needs one as well (its device mesh), in memory when no torchrun set up a rendezvous.
    """
    deepspeed = engine == "deepspeed"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = None
    if world > 1 or engine in ("deepspeed", "fsdp"):
        backend = "nccl" if cuda else "gloo"
        if deepspeed:
            import deepspeed as ds  # optional extra: pip install -e .[deepspeed]

            ds.init_distributed(dist_backend=backend)
        elif not dist.is_initialized() and "MASTER_ADDR" not in os.environ:  # plain python -m: one process
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        elif not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64: token counts and loss sums stay exact enough)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (the resume decision must be the same everywhere)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compile_blocks(lm: Any) -> None:
    """torch.compile each decoder layer (torchtitan's per-block compile: small graphs, one per layer kind).

    Applied after activation checkpointing and before DDP/FSDP wrap the model, so each compiled
    region is one layer's forward; the first step pays the compile time (minutes for a large model).
    """
    for layer in lm.get_decoder().layers:
        layer.compile()
