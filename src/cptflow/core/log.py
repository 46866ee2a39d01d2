"""Logging set-up shared by every stage's ``main``.

Each rule passes ``--log results/<run>/logs/<rule>/<wildcards>.log``; the log gets timestamps and
the stage name, and WARNINGs also reach stderr so a person running Snakemake sees fallbacks. In
distributed runs rank 0 logs at INFO and the other ranks at WARNING, prefixed with their rank.

The rules also append the job's stderr to that same file (``2>> {log}``, for tracebacks and library
warnings). When stderr already is the log file, no stderr handler is added: every line is written
once, not twice.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from cptflow.core.io import PathLike


def setup(path: PathLike | None = None, name: str = "cptflow", rank: int | None = None) -> logging.Logger:
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    teardown()
    for h in list(root.handlers):  # a plain handler someone else installed (basicConfig) would double lines
        if type(h) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(h)
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path, mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        fh.setLevel(level)
        _own(fh)
        root.addHandler(fh)
    if not (path and _stderr_is(path)):
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(fmt)
        # Without a log file everything goes to stderr; with one, only warnings do.
        err.setLevel(logging.WARNING if path else level)
        _own(err)
        root.addHandler(err)
    return logging.getLogger(name)


def _own(handler: logging.Handler) -> None:
    handler._cptflow = True  # type: ignore[attr-defined]


def teardown() -> None:
    """Remove and close the handlers ``setup`` added (a stage run in-process leaves none behind)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cptflow", False):
            root.removeHandler(h)
            h.close()


def _stderr_is(path: PathLike) -> bool:
    """True when this process's stderr is the file ``path`` (a rule's ``2>> {log}``)."""
    try:
        a, b = os.fstat(sys.stderr.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):  # no real stderr (captured, closed)
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
