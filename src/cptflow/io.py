"""File helpers every stage shares: atomic writes, deterministic JSON/JSONL, hashing.

Snakemake trusts any file that exists, so a stage must never leave a half-written output under its
final name: everything is written to a temporary sibling and renamed on success (``os.replace`` is
atomic within one file system). JSON is written with sorted keys and fixed separators so that the
same data gives the same bytes, which is what the reproducibility tests compare.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    Works for files and directories. On failure the temporary is removed and an existing ``path``
    is left untouched, so a failed rerun loses nothing.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and final.is_dir():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def dumps_json(obj: Any) -> str:
    """Canonical JSON for files that are compared byte for byte."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=2) + "\n"


def write_json(path: PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_json(obj), encoding="utf-8")


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dumps_record(record: dict[str, Any]) -> str:
    """One JSONL line; keys keep insertion order (stages build records in a fixed order)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(path: PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically, one per line; return how many were written."""
    n = 0
    with atomic_path(path) as tmp:
        if str(path).endswith(".gz"):
            # mtime=0 in the gzip header keeps .gz outputs byte-identical across runs.
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                for r in records:
                    gz.write((dumps_record(r) + "\n").encode("utf-8"))
                    n += 1
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(dumps_record(r))
                    f.write("\n")
                    n += 1
    return n


def iter_records(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line of a JSONL(.gz) file cptflow or a user wrote.

    A line that is not JSON raises ``ValueError`` naming ``path:line``. Raw, untrusted corpora go
    through ``cptflow.ingest`` instead, which quarantines bad lines and goes on.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def iter_jsonl(path: PathLike) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file that cptflow itself wrote."""
    for _, rec in iter_records(path):
        yield rec


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: PathLike) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()
