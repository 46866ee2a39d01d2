"""The thin command-line layer shared by every stage module.

A rule calls ``python -m cptflow.<stage> --params '<json>' --log <file> <file flags>``. ``stage_main``
parses the flags, sets up logging, logs the resolved parameters and versions, runs the stage, and
turns a ``ValueError`` (bad input, bad config: messages name the file/line or field) into a one-line
error and exit code 2 instead of a traceback a person has to read backwards. The error is logged
once: to the log file, and to stderr when stderr is not that file (``cptflow.core.log``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cptflow import __version__
from cptflow.core.config import load_params
from cptflow.core.log import setup, teardown


def parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--params", default="", help="stage config as JSON, or @file.(json|yaml)")
    # --log-file is the spelling to use behind torchrun, whose own parser would take `--log` for an
    # ambiguous abbreviation of its --log-dir/--logs-specs and stop.
    p.add_argument("--log", "--log-file", dest="log", default=None, help="log file (default: stderr only)")
    return p


def stage_main(
    name: str,
    argv: Sequence[str] | None,
    build: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace, dict[str, Any]], Any],
    description: str = "",
    prog: str | None = None,
) -> int:
    """Parse ``argv`` with the flags added by ``build``, then call ``run(args, params)``."""
    p = parser(description or f"cptflow {name} stage", prog)
    build(p)
    args = p.parse_args(argv)
    log = setup(args.log, f"cptflow.{name}")
    try:
        params = load_params(args.params)
        log.info("cptflow %s, stage %s, python %s", __version__, name, sys.version.split()[0])
        log.info("params: %s", params)
        run(args, params)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s failed: %s", name, e)
        return 2
    finally:
        teardown()
    return 0
