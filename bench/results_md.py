"""What every benchmark script shares: the machine line and writing its own section of RESULTS.md.

Each script owns the part of ``bench/RESULTS.md`` between its ``<!-- bench:<name>:start/end -->``
markers, so scripts can be rerun one at a time (or concurrently) without clobbering each other.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_info() -> str:
    """One line about the machine (results depend on it, and on the load: see run_info)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "?")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def git_commit() -> str:
    """The commit measured, with '+uncommitted changes' when the tree differs from it (then say what)."""
    import subprocess

    root = RESULTS.parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "bench", "workflow", "config",
                                ":!bench/RESULTS.md"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + (" + uncommitted changes" if dirty else "")


def run_info(script: str, load_start: tuple[float, ...]) -> str:
    """When, where, at which commit, with which command, and how busy the shared machine was (1-min load)."""
    return (f"`{shlex.join(['.venv/bin/python', f'bench/{script}', *sys.argv[1:]])}`" +
            f", {time.strftime('%Y-%m-%d %H:%M')}, commit {git_commit()}. {machine_info()}; 1-min load average "
            f"{load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end (other jobs share the cores).")


def write_section(name: str, body: str) -> None:
    """Replace only this script's section of RESULTS.md (others are written concurrently by other scripts).

    The file is re-read immediately before writing and replaced by rename, so the window in which
    another script's update could be lost is a few microseconds.
    """
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    if RESULTS.exists():
        text = RESULTS.read_text(encoding="utf-8")
    else:
        text = ("# cptflow benchmarks\n\nEach section below is written by the script it names "
                "(`bench/<name>.py` writes the part between the `<!-- bench:<name>:start/end -->` markers); "
                "edit the scripts, not this file. Benchmarks are not part of CI.\n\n"
                f"Machine when this file was created: {machine_info()}.\n")
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        b += text[b:b + 1] == "\n"
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, RESULTS)
    print(f"wrote section '{name}' of {RESULTS}", file=sys.stderr)
