"""File helpers every stage shares: atomic writes, deterministic JSON/JSONL, hashing.

Snakemake trusts any file that exists, so a stage must never leave a half-written output under its
final name: everything is written to a temporary sibling and renamed on success (``os.replace`` is
atomic within one file system). JSON is written with sorted keys and fixed separators so that the
same data gives the same bytes, which is what the reproducibility tests compare.

Intermediate JSONL between the data stages is zstd-compressed (``.jsonl.zst``: a third to a half of
the bytes of plain JSONL for Chinese web text, read and written at hundreds of MB/s); the suffix of
the final path decides, for reading (``iter_records``) as for writing (``atomic_text``). The zstd
stream is a sequence of independent frames of ``ZSTD_BLOCK_BYTES`` of text each, at level 3, so the
bytes depend only on the text (the ``zstd`` command line reads them: ``zstdcat x.jsonl.zst``).

A job killed mid-write leaves its temporary behind (``.<name>.tmp-<host>-<pid>``). The next job that
writes the same output sweeps it (``sweep_stale_temps``), but only when it is stale: written by a
process of this host that no longer runs, or, for another host's (or an unnamed) writer, not touched
for ``STALE_AFTER_S``. Only temporaries of the output being written are looked at, so a concurrent
job's live temporary of another output is never touched.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]
log = logging.getLogger("cptflow.core.io")

# A writer on another host cannot be asked whether it still runs; one that has not touched its
# temporary for an hour is taken for dead. (Snakemake's lock already keeps two live jobs from
# writing the same output; this only guards against a run started with --nolock.)
STALE_AFTER_S = 3600
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
ZSTD_LEVEL = 3  # zstd's own default: 0.36 of modern Chinese JSONL at ~40 MB/s here (level 1: 0.45)
ZSTD_BLOCK_BYTES = 1 << 20  # text per zstd frame: big enough for the ratio, small enough to buffer


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temps(path: PathLike, now: float | None = None) -> list[Path]:
    """Remove leftover temporaries of ``path`` (from ``atomic_path``) whose writer is gone; return them."""
    final = Path(path)
    now = time.time() if now is None else now
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{final.name}.{kind}-"
        for found in glob.glob(glob.escape(str(final.parent / prefix)) + "*"):
            p = Path(found)
            owner = p.name[len(prefix):]
            host, _, pid = owner.rpartition("-")
            if pid == str(os.getpid()) and host == _HOST:
                continue  # our own: atomic_path replaces it
            if host == _HOST and pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:  # another host, or the pid-only names of older versions
                try:
                    stale = now - p.lstat().st_mtime > STALE_AFTER_S
                except FileNotFoundError:
                    continue
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    _remove(p)
                log.info("removed %s, left by a killed job (writer %s)", p, owner)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    Works for files and directories. On failure the temporary is removed and an existing ``path``
    is left untouched, so a failed rerun loses nothing.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(final)
    tmp = _tmp_sibling(final)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and final.is_dir():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = final.with_name(f".{final.name}.old-{_HOST}-{os.getpid()}")
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


class _ZstdWriter(io.RawIOBase):
    """Binary sink that zstd-compresses every ``ZSTD_BLOCK_BYTES`` written as one frame."""

    def __init__(self, raw: IO[bytes]):
        import pyarrow as pa

        self.raw, self.buf = raw, bytearray()
        self.codec = pa.Codec("zstd", compression_level=ZSTD_LEVEL)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += b
        while len(self.buf) >= ZSTD_BLOCK_BYTES:
            self._frame(bytes(self.buf[:ZSTD_BLOCK_BYTES]))
            del self.buf[:ZSTD_BLOCK_BYTES]
        return len(b)

    def _frame(self, data: bytes) -> None:
        self.raw.write(self.codec.compress(data, asbytes=True))

    def close(self) -> None:
        if not self.closed:
            if self.buf:
                self._frame(bytes(self.buf))
                self.buf.clear()
            self.raw.close()
        super().close()


def open_text(path: PathLike, mode: str = "r", like: PathLike | None = None) -> IO[str]:
    """A text file opened for reading ("r") or writing ("w"), compressed by the suffix of ``like``.

    ``like`` defaults to ``path``; writers pass the final name when ``path`` is a temporary one.
    ``.zst``: zstd frames (see the module doc); ``.gz``: gzip with mtime 0 (byte-identical reruns).
    """
    name = str(like if like is not None else path)
    if mode not in ("r", "w"):
        raise ValueError(f"open_text: mode {mode!r} is not 'r' or 'w'")
    if name.endswith(".zst"):
        if mode == "r":
            import pyarrow as pa

            return io.TextIOWrapper(pa.CompressedInputStream(pa.OSFile(str(path), "rb"), "zstd"), encoding="utf-8")
        return io.TextIOWrapper(io.BufferedWriter(_ZstdWriter(open(path, "wb")), ZSTD_BLOCK_BYTES),
                                encoding="utf-8", newline="\n")
    if name.endswith(".gz"):
        if mode == "r":
            return gzip.open(path, "rt", encoding="utf-8")
        raw = open(path, "wb")
        # filename "": the header would otherwise hold the (temporary, per-process) name of ``raw``.
        gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0)
        gz.myfileobj = raw  # closed together with the gzip stream
        return io.TextIOWrapper(gz, encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n" if mode == "w" else None)


@contextlib.contextmanager
def atomic_text(path: PathLike) -> Iterator[IO[str]]:
    """A text file written under a temporary name, compressed by ``path``'s suffix, renamed on success."""
    with atomic_path(path) as tmp:
        f = open_text(tmp, "w", like=path)
        try:
            yield f
        finally:
            f.close()


def write_jsonl(path: PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically, one per line (.zst/.gz compressed by suffix); return how many were written."""
    n = 0
    with atomic_text(path) as f:
        for r in records:
            f.write(dumps_record(r))
            f.write("\n")
            n += 1
    return n


def iter_records(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line of a JSONL(.gz/.zst) file cptflow or a user wrote.

    A line that is not JSON raises ``ValueError`` naming ``path:line``. Raw, untrusted corpora go
    through ``cptflow.data.ingest`` instead, which quarantines bad lines and goes on.
    """
    with open_text(path) as f:
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


# Snakemake touches this (empty) file into every directory() output after its job: not content, and
# counting it would make a directory's digest change after its manifest was written.
_NOT_CONTENT = frozenset({".snakemake_timestamp"})


def _content_files(p: Path) -> list[Path]:
    return sorted(q for q in p.rglob("*") if q.is_file() and q.name not in _NOT_CONTENT)


def sha256_path(path: PathLike) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in _content_files(p):
        h.update(str(f.relative_to(p)).encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def size_path(path: PathLike) -> int:
    """Bytes of a file, or of all files under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in _content_files(p))
