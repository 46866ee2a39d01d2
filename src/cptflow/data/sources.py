"""Resolving the ``sources`` of a run config into one entry per input file.

Each input file becomes its own chain of jobs (ingest → clean → signature → ... ), keyed by
``<source>/<part>``, where ``part`` is the file name without its corpus extension. Keying by file
name (not by task rank, as datatrove does) is what makes a rerun after adding or changing one file
touch only that file's jobs plus the global ones.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptflow.core.config import ConfigError

EXTENSIONS = (".jsonl.gz", ".jsonl", ".parquet")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    category: str
    paths: list[str]
    text_field: str = "text"
    lang: str = "zh"


@dataclass(frozen=True)
class InputFile:
    source: str
    part: str
    path: str
    category: str
    lang: str
    text_field: str

    @property
    def key(self) -> str:
        return f"{self.source}/{self.part}"


def part_name(path: str) -> str:
    name = Path(path).name
    for ext in EXTENSIONS:
        if name.endswith(ext):
            return _SAFE.sub("_", name[: -len(ext)])
    raise ConfigError(f"{path}: unsupported corpus file type (expected one of {', '.join(EXTENSIONS)})")


def resolve_sources(sources: list[dict[str, Any]], root: str | Path = ".") -> list[InputFile]:
    """Expand every source's globs (relative to ``root``) into sorted, uniquely named input files."""
    root = Path(root)
    out: list[InputFile] = []
    names: set[str] = set()
    for i, raw in enumerate(sources):
        spec = SourceSpec(**raw)
        where = f"sources[{i}] ({spec.name})"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.name):
            raise ConfigError(f"{where}: name may only use letters, digits, '_', '.', '-'")
        if spec.name in names:
            raise ConfigError(f"{where}: duplicate source name")
        names.add(spec.name)
        files: dict[str, str] = {}
        for pattern in spec.paths:
            full = pattern if Path(pattern).is_absolute() else str(root / pattern)
            matches = sorted(glob.glob(full, recursive=True))
            if not matches:
                raise ConfigError(f"{where}: path pattern {pattern!r} matches no file (looked in {root.resolve()})")
            for m in matches:
                part = part_name(m)
                if part in files and files[part] != m:
                    raise ConfigError(f"{where}: files {files[part]} and {m} both map to part name {part!r}; rename one")
                files[part] = m
        for part in sorted(files):
            # Relative to the working directory where possible (short, portable paths in logs and
            # manifests), else absolute: a file found under the repository must still be found from
            # a run in another working directory.
            path = Path(files[part]).resolve()
            try:
                shown = str(path.relative_to(Path.cwd().resolve()))
            except ValueError:
                shown = str(path)
            out.append(InputFile(spec.name, part, shown, spec.category, spec.lang, spec.text_field))
    return out
