"""Stages check what they read: every input is compared with what its producer's manifest recorded.

Snakemake trusts any file that exists and is older than its consumers, so an intermediate cut at a
line boundary (or cut and given back its mtime) would flow on and lose documents with exit code 0.
Every manifest (``cptflow.core.stats.write_manifest``) records the sha256 and the size of each
output; a consuming stage calls ``verify_inputs`` on the files it reads before it reads them, and
a file that differs is an error naming the file, its manifest and both digests.

Cost: the size is free and catches a truncation at once; the sha256 reads the file once more, at
0.5-1.2 GB/s here (hashlib with SHA-NI), against about 1-12 MB/s for the clean stage itself:
bench/hostile_input.py measured the check at 0.2 % of the clean stage on a 51 MB file. Counting
lines instead would not be cheaper (1.5 GB/s in Python) and would miss a changed line; the check is
on bytes on disk, so it holds for compressed intermediates as well.

Where is the producer's manifest? Given explicitly (``manifests=``), or found by the convention
every rule follows: beside the file, named like it with its extensions replaced by ``.stats.json``
(``clean/s/a.jsonl`` and ``clean/s/a.dropped.jsonl`` → ``clean/s/a.stats.json``, ``shards/zh_web/``
→ ``shards/zh_web.stats.json``), else any manifest in the same folder (a training stage writes
``train/<stage>/model/`` with ``train/<stage>/train.stats.json`` beside it). A file that no manifest
lists (a user's own file, a stage run by hand) is read unchecked, with a warning; in the workflow
every intermediate has its manifest, because Snakemake remakes a missing output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike, read_json, sha256_path, size_path

log = logging.getLogger("cptflow.core.provenance")
MANIFEST_SUFFIX = ".stats.json"


class InputMismatch(ValueError):
    """An input differs from what its producer recorded; the message names the file and the manifest."""


def sibling_manifests(path: PathLike) -> list[Path]:
    """Candidate manifests of ``path`` by the naming convention, most specific first."""
    p = Path(path)
    name = p.name
    out = []
    while True:
        out.append(p.with_name(name + MANIFEST_SUFFIX))
        if "." not in name.lstrip("."):
            break
        name = name.rsplit(".", 1)[0]
    return [m for m in dict.fromkeys(out[1:] + out[:1]) if m != p]


def _key(path: PathLike, listed: Iterable[str]) -> str | None:
    """The key under which a manifest lists ``path``: same path, else the same file name (once)."""
    listed = list(listed)
    want, want_abs = os.path.normpath(str(path)), os.path.abspath(path)
    for k in listed:
        if os.path.normpath(k) == want or os.path.abspath(k) == want_abs:
            return k
    same_name = [k for k in listed if Path(k).name == Path(path).name]
    return same_name[0] if len(same_name) == 1 else None


def folder_manifests(path: PathLike) -> list[Path]:
    """Every manifest in the folder of ``path``, sorted: the fallback when no name matches."""
    parent = Path(path).parent
    return sorted(parent.glob("*" + MANIFEST_SUFFIX)) if parent.is_dir() else []


def find_record(path: PathLike, manifests: Sequence[PathLike] = ()) -> tuple[Path, dict[str, Any], str] | None:
    """(manifest path, manifest, key) of the manifest that lists ``path`` among its outputs, or None.

    The folder is only searched when neither the given manifests nor the naming convention list the
    file, so the data stages' folders of thousands of manifests are never read one by one.
    """
    found = _record_in(path, [*map(Path, manifests), *sibling_manifests(path)])
    return found if found is not None else _record_in(path, folder_manifests(path))


def _record_in(path: PathLike, candidates: Iterable[Path]) -> tuple[Path, dict[str, Any], str] | None:
    for m in dict.fromkeys(candidates):
        if not m.is_file():
            continue
        try:
            manifest = read_json(m)
        except ValueError as e:
            raise InputMismatch(f"{m}: manifest of {path} is not valid JSON ({e}); delete it and rerun") from e
        key = _key(path, manifest.get("outputs") or {})
        if key is not None:
            return m, manifest, key
    return None


def verify_input(path: PathLike, manifests: Sequence[PathLike] = ()) -> bool:
    """Check ``path`` against its producer's manifest; True if checked, False if no manifest lists it."""
    found = find_record(path, manifests)
    if found is None:
        log.warning("%s: no manifest lists this file; it is read unchecked", path)
        return False
    mpath, manifest, key = found
    stage = manifest.get("stage", "its producer")
    want_sha = manifest["outputs"][key]
    want_bytes = (manifest.get("output_bytes") or {}).get(key)
    got_bytes = size_path(path)
    if want_bytes is not None and got_bytes != want_bytes:
        on_disk = f"{got_bytes} bytes"  # no need to hash: the size already differs
    else:
        got_sha = sha256_path(path)
        if got_sha == want_sha:
            log.info("%s: matches the manifest of %s (%s)", path, stage, mpath)
            return True
        on_disk = f"{got_bytes} bytes, sha256 {got_sha}"
    raise InputMismatch(
        f"{path}: differs from what {stage} wrote (manifest {mpath}: {want_bytes} bytes, sha256 {want_sha}; "
        f"on disk: {on_disk}). It was truncated or changed after it was written: delete it and rerun the "
        "workflow, which makes it again."
    )


def verify_inputs(paths: Iterable[PathLike], manifests: Sequence[PathLike] = ()) -> int:
    """``verify_input`` for each path; return how many were checked."""
    return sum(verify_input(p, manifests) for p in paths)


def upstream(paths: Iterable[PathLike], limit: int = 10_000) -> list[tuple[Path, dict[str, Any]]]:
    """Manifests of the producers of ``paths`` and, recursively, of their inputs (nearest first)."""
    seen: set[Path] = set()
    out: list[tuple[Path, dict[str, Any]]] = []
    todo = list(paths)
    while todo and len(out) < limit:
        found = find_record(todo.pop(0))
        if found is None or found[0] in seen:
            continue
        seen.add(found[0])
        out.append((found[0], found[1]))
        todo.extend(found[1].get("inputs") or {})
    return out
