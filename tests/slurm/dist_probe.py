"""A tiny real torch.distributed (gloo) program, the stand-in target of cptflow.train.launch in tests/test_slurm.py.

Every worker all-reduces its rank (sum must be world_size*(world_size-1)/2) and all-gathers what it knows
about where it runs; rank 0 writes one JSON file. The test reads it to prove the workers really spanned
two SLURM nodes. Run by torchrun: ``python -m dist_probe --out FILE`` (with this folder on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# what proves where a worker ran: SLURM's step variables (set by srun on each node), the GPUs SLURM gave the
# node, the CPUs of the step, and torchrun's rendezvous and rank variables
ENV_KEYS = ("SLURM_JOB_ID", "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_PROCID", "SLURM_CPUS_PER_TASK",
            "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
            "GROUP_RANK", "WORLD_SIZE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    me = {"rank": rank, "host": socket.gethostname(), **{k: os.environ.get(k) for k in ENV_KEYS}}
    everyone: list[dict | None] = [None] * world
    dist.all_gather_object(everyone, me)
    if rank == 0:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"world_size": world, "rank_sum": t.item(), "workers": everyone},
                                  sort_keys=True, indent=1) + "\n")
        tmp.rename(out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
