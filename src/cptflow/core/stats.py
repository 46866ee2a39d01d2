"""Counters per stage and the provenance manifest written beside every output.

Like datatrove's ``stat_update``, a stage counts anything through ``Stats.update(label, value)``.
Conventions that the funnel and the report rely on:

* ``docs_in`` / ``chars_in``: what the stage read; ``docs_out`` / ``chars_out``: what it kept;
* ``dropped/<reason>`` and ``dropped_chars/<reason>``: documents removed, by ``<stage>_<why>`` reason;
* anything else (``masked/email``, ``pairs``, ...) is stage-specific.

The manifest (``<output>.stats.json``) adds what is needed to trust and reproduce the output: sha256
of every input, sha256 and size of every output, the parameters, the stage's ``VERSION``, the
package version and git commit, the wall time and the process's peak RSS. Reruns, the report and the consuming stages
(``cptflow.core.provenance``) read it; nothing parses logs.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptflow import __version__
from cptflow.core.io import PathLike, sha256_path, size_path, write_json


@dataclass
class Stats:
    """Named counters; ints stay ints so that JSON counts are exact."""

    counts: dict[str, float] = field(default_factory=lambda: defaultdict(int))

    def update(self, label: str, value: float = 1) -> None:
        self.counts[label] += value

    def drop(self, reason: str, chars: int) -> None:
        """Count one dropped document under ``reason`` (a ``<stage>_<why>`` string)."""
        self.counts[f"dropped/{reason}"] += 1
        self.counts[f"dropped_chars/{reason}"] += chars

    def __getitem__(self, label: str) -> float:
        return self.counts.get(label, 0)

    def merge(self, other: "Stats | Mapping[str, float]") -> None:
        items = other.counts.items() if isinstance(other, Stats) else other.items()
        for k, v in items:
            self.counts[k] += v

    def to_dict(self) -> dict[str, float]:
        return {k: self.counts[k] for k in sorted(self.counts)}

    def under(self, prefix: str) -> dict[str, float]:
        """The counters named ``<prefix>/<rest>``, keyed by ``rest`` (sorted): e.g. drops by reason."""
        head = prefix + "/"
        return {k[len(head):]: v for k, v in self.to_dict().items() if k.startswith(head)}


def git_commit(start: PathLike | None = None) -> str | None:
    """The commit of the checkout the package runs from, or None outside git."""
    cwd = Path(start) if start else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_manifest(
    path: PathLike,
    *,
    stage: str,
    version: int | str,
    params: Mapping[str, Any],
    inputs: Iterable[PathLike],
    stats: Stats | Mapping[str, float],
    seconds: float,
    outputs: Iterable[PathLike] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the provenance manifest of one stage run and return it."""
    counts = stats.to_dict() if isinstance(stats, Stats) else dict(sorted(stats.items()))
    outputs = [p for p in outputs if Path(p).exists()]
    manifest: dict[str, Any] = {
        "stage": stage,
        "stage_version": version,
        "cptflow_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "params": dict(params),
        "inputs": {str(p): sha256_path(p) for p in inputs},
        "outputs": {str(p): sha256_path(p) for p in outputs},
        # Checked before the sha256 by the stages that read these files: a truncation shows at once.
        "output_bytes": {str(p): size_path(p) for p in outputs},
        "counts": counts,
        "seconds": round(seconds, 3),
        # The most memory this process has held so far (its whole run, as the manifest is written last):
        # what a job's mem_mb must cover. Linux reports ru_maxrss in KiB.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        manifest.update(extra)
    write_json(path, manifest)
    return manifest


class Timer:
    """``with Timer() as t: ...; t.seconds`` — wall time of a block."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
