"""Helpers shared by the workflow tests (tests/workflow/): running Snakemake, reading which jobs it ran."""

import re
import subprocess
from pathlib import Path


def run_checked(cmd: list[str], results: Path, timeout: int = 1500, logs: int = 2) -> subprocess.CompletedProcess:
    """Run a snakemake command line; on failure, raise with its stderr and the tails of the newest job logs."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        newest = sorted(results.rglob("*.log"), key=lambda p: p.stat().st_mtime)[-logs:]
        tail = "\n".join(f"== {p}\n{p.read_text()[-1500:]}" for p in newest)
        raise AssertionError(f"snakemake failed:\n{proc.stderr[-5000:]}\n{tail}")
    return proc


def jobs_run(proc: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job Snakemake started (or, in a dry run, planned), from its own output."""
    out, rule = [], None
    for line in (proc.stderr + "\n" + proc.stdout).splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            if rule:
                out.append((rule, ""))
            rule = m.group(1)
            continue
        m = re.match(r"^\s+wildcards: (.*)$", line)
        if m and rule:
            out.append((rule, m.group(1)))
            rule = None
    if rule:
        out.append((rule, ""))
    return out
