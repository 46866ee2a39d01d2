"""Build (and run) the torchrun command line of a training rule, locally or across SLURM nodes.

Training rules call ``python -m cptflow.train.launch --nodes N --procs-per-node P -- <cptflow.train.train flags>``
instead of spelling out torchrun, so the same rule runs on a laptop and on a multi-node SLURM job:

- ``--nodes 1``: ``torchrun --standalone`` on this machine (also inside a one-node SLURM job, where the
  job-step plugin has already placed us on the node).
- ``--nodes N > 1``: one ``srun`` step with one task per node; each task starts one torchrun agent with
  static rendezvous at the first node of the step. This must run *inside the batch script* of an
  allocation of N nodes, i.e. a rule with ``resources: nodes=N, tasks=N, mpi="srun"``: the mere presence
  of ``mpi`` makes snakemake-executor-plugin-slurm-jobstep run the rule's shell directly in the batch
  script instead of wrapping it in ``srun -n1``, so our own ``srun`` can span all nodes.

Why the details are as they are (checked on a two-virtual-node SLURM 22.05 cluster, tests/slurm/):

- The job-step plugin strips most ``SLURM_*`` variables (SLURM_NNODES, SLURM_JOB_NODELIST,
  SLURM_CPUS_PER_TASK...) before running the rule's shell; only SLURM_JOB_ID survives. So srun gets
  ``--nodes/--ntasks/--cpus-per-task`` explicitly, and everything node-specific (node rank, node list) is
  read inside each srun task, where srun sets those variables afresh. Hence the single-quoted ``bash -c``.
- MASTER_ADDR is the ``NodeAddr`` of the step's first node as SLURM itself knows it (``scontrol show
  node``), falling back to the node name: node names need not resolve (virtual nodes ``n1``/``n2`` on one
  host have NodeAddr 127.0.0.1), and on ordinary clusters NodeAddr defaults to the resolvable node name.
- MASTER_PORT is derived from SLURM_JOB_ID so two training jobs sharing a first node use different ports
  (unless their job ids differ by a multiple of 20000).
- Each node's task prints one line to stderr (the rule's log): ``cptflow launch: node <name> node-rank <r>
  of <N>, master <addr>:<port>``.
- ``srun --kill-on-bad-exit=1``: when one node's agent dies the others are killed instead of waiting for
  the rendezvous timeout.
- torchrun is started as ``<python> -m torch.distributed.run`` (what the ``torchrun`` script runs) with the
  interpreter given, by default the one running this module, so a job whose PATH lacks the venv's bin/
  still gets the right torch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# Ports 20000-39999: above the usual service ports. The upper part overlaps Linux's ephemeral range
# (32768+); a clash needs an outgoing connection to hold that very port at start-up on the first node: rare,
# and it fails loudly (torchrun cannot bind), it never mixes two jobs.
DEFAULT_PORT_BASE = 20000
DEFAULT_PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchConfig:
    """How many nodes and processes a training run uses, and what each process runs."""

    nodes: int = 1  # machines; > 1 needs a SLURM allocation of that many nodes (srun spans them)
    # torchrun workers per node: a count (CPU processes with gloo, or GPUs per node), or "gpu" = one per GPU
    # visible on the node (torchrun's own --nproc-per-node=gpu; under SLURM that is the node's share of
    # --gpus-per-node, so the GPU count is written once, in the profile)
    procs_per_node: int | str = 1
    module: str = "cptflow.train.train"  # python module each worker runs (python -m <module> <args>)
    python: str = "python"  # interpreter on the nodes; the CLI passes sys.executable
    # srun --cpus-per-task for each node's agent (all its workers share them). None: srun's default,
    # which is 1 CPU per task -- on clusters with task/cgroup all workers would share one core, so
    # rules pass their threads here.
    cpus_per_task: int | None = None
    port_base: int = DEFAULT_PORT_BASE  # MASTER_PORT = port_base + SLURM_JOB_ID % port_span
    port_span: int = DEFAULT_PORT_SPAN

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.procs_per_node != "gpu" and not (isinstance(self.procs_per_node, int) and self.procs_per_node >= 1):
            raise ValueError(f"procs_per_node must be an int >= 1 or 'gpu', got {self.procs_per_node!r}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task must be >= 1 or None, got {self.cpus_per_task}")
        if not self.module or any(c.isspace() for c in self.module):
            raise ValueError(f"module must be a dotted module name, got {self.module!r}")
        if not (1024 <= self.port_base and self.port_base + self.port_span <= 65536 and self.port_span >= 1):
            raise ValueError(f"ports {self.port_base}..{self.port_base + self.port_span - 1} outside 1024..65535")


def _join(words: Sequence[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def local_command(cfg: LaunchConfig, args: Sequence[str]) -> str:
    """One-node command: torchrun --standalone picks a free port and rendezvous on localhost itself."""
    return _join(
        [cfg.python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         f"--nproc-per-node={cfg.procs_per_node}", "-m", cfg.module, *args]
    )


def node_script(cfg: LaunchConfig, args: Sequence[str]) -> str:
    """What each srun task (one per node) runs: find the master, then exec one torchrun agent.

    Variables are expanded by the task's own bash, where srun has set SLURM_NODEID, SLURM_JOB_ID and
    SLURM_STEP_NODELIST (SLURM_JOB_NODELIST as fallback) for that node.
    """
    torchrun = _join(
        [cfg.python, "-m", "torch.distributed.run", f"--nnodes={cfg.nodes}",
         f"--nproc-per-node={cfg.procs_per_node}"]
    )
    worker = _join(["-m", cfg.module, *args])
    lines = [
        "set -eu",  # no pipefail: head closing the pipe early must not fail the pipeline
        'first=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n1)',
        'addr=$(scontrol show node -o "$first" | tr " " "\\n" | sed -n "s/^NodeAddr=//p")',
        'export MASTER_ADDR="${addr:-$first}"',
        f"export MASTER_PORT=$(( {cfg.port_base} + SLURM_JOB_ID % {cfg.port_span} ))",
        # one line per node in the rule's log: which node got which node rank, and where the master is
        # (what to look at first when a multi-node job hangs at the rendezvous)
        f'echo "cptflow launch: node ${{SLURMD_NODENAME:-$(hostname)}} node-rank $SLURM_NODEID of {cfg.nodes},'
        ' master $MASTER_ADDR:$MASTER_PORT" >&2',
        f'exec {torchrun} --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR"'
        f' --master-port="$MASTER_PORT" {worker}',
    ]
    return "\n".join(lines)


def slurm_command(cfg: LaunchConfig, args: Sequence[str]) -> str:
    """Multi-node command: one srun step, one task (torchrun agent) per node."""
    srun = ["srun", f"--nodes={cfg.nodes}", f"--ntasks={cfg.nodes}", "--ntasks-per-node=1"]
    if cfg.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={cfg.cpus_per_task}")
    srun.append("--kill-on-bad-exit=1")
    return _join([*srun, "bash", "-c", node_script(cfg, args)])


def build_command(cfg: LaunchConfig, args: Sequence[str]) -> str:
    """The shell command line that starts ``cfg.nodes`` x ``cfg.procs_per_node`` workers of ``cfg.module``."""
    return local_command(cfg, args) if cfg.nodes == 1 else slurm_command(cfg, args)


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split at the first ``--``: launcher flags before it, the worker module's flags after it."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def procs_arg(text: str) -> int | str:
    """``--procs-per-node`` value: a positive int, or ``gpu``."""
    return text if text == "gpu" else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cptflow.train.launch",
        description="Start torchrun for a training run: locally (--nodes 1) or with srun across the nodes of "
        "the current SLURM allocation (--nodes N > 1). Flags after -- go to the worker module.",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes; > 1 needs a SLURM allocation (default 1)")
    p.add_argument("--procs-per-node", type=procs_arg, default=1,
                   help="workers per node: a number, or 'gpu' for one per visible GPU (default 1)")
    p.add_argument("--module", default=LaunchConfig.module, help="worker module (default cptflow.train.train)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="srun --cpus-per-task per node (multi-node only)")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    own, worker_args = split_argv(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(own)
    try:
        cfg = LaunchConfig(nodes=ns.nodes, procs_per_node=ns.procs_per_node, module=ns.module,
                           python=ns.python, cpus_per_task=ns.cpus_per_task)
    except ValueError as e:
        print(f"cptflow launch: error: {e}", file=sys.stderr)
        return 2
    cmd = build_command(cfg, worker_args)
    if ns.dry_run:
        print(cmd)
        return 0
    if cfg.nodes > 1 and "SLURM_JOB_ID" not in os.environ:
        print(
            f"cptflow launch: error: --nodes {cfg.nodes} needs a SLURM allocation of {cfg.nodes} nodes "
            "(SLURM_JOB_ID is unset): run the rule through profiles/slurm with "
            f"resources nodes={cfg.nodes}, tasks={cfg.nodes}, mpi='srun'",
            file=sys.stderr,
        )
        return 2
    print(f"cptflow launch: {cmd}", file=sys.stderr, flush=True)
    os.execvp("bash", ["bash", "-c", cmd])
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
