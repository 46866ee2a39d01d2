"""Logging set-up shared by every stage's ``main``.

Each rule passes ``--log results/<run>/logs/<rule>/<wildcards>.log``; the log gets timestamps and
the stage name, and WARNINGs also reach stderr so a person running Snakemake sees fallbacks. In
distributed runs rank 0 logs at INFO and the other ranks at WARNING, prefixed with their rank.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from cptflow.io import PathLike


def setup(path: PathLike | None = None, name: str = "cptflow", rank: int | None = None) -> logging.Logger:
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    # Without a log file everything goes to stderr; with one, only warnings do.
    err.setLevel(logging.WARNING if path else level)
    root.addHandler(err)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path, mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        fh.setLevel(level)
        root.addHandler(fh)
    return logging.getLogger(name)
