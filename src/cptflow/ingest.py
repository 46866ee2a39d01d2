"""Ingest stage: read one raw corpus file and write its documents in the intermediate format.

Raw corpora are untrusted: a crawl dump has lines cut in half, bytes that are not UTF-8, records
without the text field. None of that may stop the run, and none of it may vanish: every bad record
goes to a quarantine JSONL with the file, line and reason, and is counted under
``dropped/<reason>``. Reasons: ``ingest_bad_utf8`` (bytes that are not UTF-8, or a JSON ``\\ud800``
escape that cannot be written as UTF-8), ``ingest_bad_json``, ``ingest_not_object``,
``ingest_missing_field`` (key absent or null), ``ingest_not_string``, ``ingest_empty_text``
(empty or whitespace only).

JSONL (optionally gzipped) is read as bytes, line by line, so one bad line costs one record. Blank
lines are not records: they are counted as ``skipped/ingest_empty_line`` and neither quarantined nor
part of ``docs_in``, so ``docs_in == docs_out + sum(dropped/*)`` always holds. A truncated or corrupt
gzip is a broken file rather than a bad record: it raises an error naming the file and no output is
written (the outputs are atomic). Parquet is read column-wise; a row is a record, its 1-based row
number is its "line", and a missing column is an error naming the columns that exist.

``chars_in`` counts the text of good records plus the characters of each bad line (so
``chars_in == chars_out + sum(dropped_chars/*)``); ``bytes_in`` is the input file's size on disk.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptflow.cli import stage_main
from cptflow.config import ConfigError, from_dict, to_dict
from cptflow.io import PathLike, atomic_path, dumps_record
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
log = logging.getLogger("cptflow.ingest")

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class IngestConfig:
    """Settings of the ingest stage (config section ``ingest:``)."""

    max_excerpt_chars: int = 200  # quarantine excerpt: enough to recognise the line, small enough to skim
    max_bad_fraction: float = 1.0  # fail the file if a larger share of its records is bad; 1.0 = never

    def __post_init__(self) -> None:
        if self.max_excerpt_chars < 0:
            raise ConfigError("ingest.max_excerpt_chars must be >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"ingest.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


def part_name(path: PathLike) -> str:
    """The file name without its known extension(s): ``ci.song.0.jsonl.gz`` → ``ci.song.0``."""
    name = Path(path).name
    for suffix in sorted(JSONL_SUFFIXES + PARQUET_SUFFIXES + (".json",), key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_value(value: Any, present: bool = True) -> tuple[str | None, str | None]:
    """(text, None) for a usable text value, else (None, reason)."""
    if not present or value is None:
        return None, "ingest_missing_field"
    if not isinstance(value, str):
        return None, "ingest_not_string"
    if not value.strip():
        return None, "ingest_empty_text"
    if _SURROGATE_RE.search(value):
        return None, "ingest_bad_utf8"
    return value, None


def parse_line(raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    """Parse one raw JSONL line: (text, None) or (None, reason). Blank lines give ``ingest_empty_line``."""
    if not raw.strip():
        return None, "ingest_empty_line"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "ingest_bad_utf8"
    try:
        obj = json.loads(line.lstrip("\ufeff"))  # a BOM on the first line is an editor artefact
    except (json.JSONDecodeError, RecursionError):
        return None, "ingest_bad_json"
    if not isinstance(obj, dict):
        return None, "ingest_not_object"
    return check_value(obj.get(text_field), text_field in obj)


def _iter_jsonl_bytes(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({e}); re-fetch or re-compress it") from e


def _iter_parquet(path: Path, text_field: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read parquet file ({e})") from e


def iter_records(path: PathLike, text_field: str) -> Iterator[tuple[int, str | None, str | None, str]]:
    """Yield (line, text, reason, bad_line_text) for every record of a raw file; bad_line_text is
    the line (or value) as text, set only when reason is not None."""
    p = Path(path)
    if p.name.endswith(PARQUET_SUFFIXES):
        for row, value in _iter_parquet(p, text_field):
            text, reason = check_value(value)
            yield row, text, reason, "" if value is None or text is not None else str(value)
    elif p.name.endswith(JSONL_SUFFIXES):
        for lineno, raw in _iter_jsonl_bytes(p):
            text, reason = parse_line(raw, text_field)
            bad = raw.rstrip(b"\r\n").decode("utf-8", errors="replace") if reason else ""
            yield lineno, text, reason, bad
    else:
        raise ValueError(f"{p}: unsupported input type (expected {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})")


def run(
    cfg: IngestConfig,
    input_path: PathLike,
    output: PathLike,
    quarantine: PathLike,
    *,
    source: str,
    category: str,
    lang: str,
    part: str | None = None,
    text_field: str = "text",
) -> Stats:
    """Validate one raw file; write good records (intermediate format) and the quarantine, atomically."""
    part = part or part_name(input_path)
    stats = Stats()
    stats.update("bytes_in", Path(input_path).stat().st_size)  # on disk (compressed for .gz)
    first_bad: str | None = None
    with atomic_path(output) as tmp_out, atomic_path(quarantine) as tmp_q:
        with open(tmp_out, "w", encoding="utf-8") as fo, open(tmp_q, "w", encoding="utf-8") as fq:
            for line, text, reason, bad in iter_records(input_path, text_field):
                if reason == "ingest_empty_line":
                    stats.update("skipped/ingest_empty_line")
                    continue
                stats.update("docs_in")
                if reason is not None:
                    stats.update("chars_in", len(bad))
                    stats.drop(reason, len(bad))
                    excerpt = bad[: cfg.max_excerpt_chars]
                    rec = {"file": str(input_path), "line": line, "reason": reason, "excerpt": excerpt}
                    fq.write(dumps_record(rec) + "\n")
                    first_bad = first_bad or f"line {line}: {reason}"
                    continue
                assert text is not None
                stats.update("chars_in", len(text))
                stats.update("docs_out")
                stats.update("chars_out", len(text))
                doc_id = f"{source}/{part}:{line}"
                rec = {"id": doc_id, "text": text, "source": source, "category": category, "lang": lang}
                fo.write(dumps_record(rec) + "\n")
        n_in, n_bad = stats["docs_in"], stats["docs_in"] - stats["docs_out"]
        if n_in and n_bad / n_in > cfg.max_bad_fraction:
            raise ValueError(
                f"{input_path}: {n_bad} of {n_in} records are bad, more than max_bad_fraction "
                f"{cfg.max_bad_fraction} (first: {first_bad}); is --text-field right?"
            )
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="raw file: .jsonl, .jsonl.gz or .parquet")
    p.add_argument("--output", required=True, help="good records, intermediate format (JSONL)")
    p.add_argument("--quarantine", required=True, help="bad records: file, line, reason, excerpt (JSONL)")
    p.add_argument("--stats", required=True, help="provenance manifest (JSON)")
    p.add_argument("--source", required=True, help="source name from the config")
    p.add_argument("--part", default=None, help="part name used in ids (default: file name without extensions)")
    p.add_argument("--category", required=True, help="data category (used by shards/pack)")
    p.add_argument("--lang", required=True, help="language code, e.g. zh or en")
    p.add_argument("--text-field", default="text", help="key (JSONL) or column (parquet) holding the text")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(IngestConfig, params, "ingest")
    with Timer() as t:
        stats = run(
            cfg, args.input, args.output, args.quarantine, source=args.source, category=args.category,
            lang=args.lang, part=args.part, text_field=args.text_field,
        )
    write_manifest(
        args.stats, stage="ingest", version=VERSION, params=to_dict(cfg), inputs=[args.input], stats=stats,
        seconds=t.seconds, outputs=[args.output, args.quarantine],
        extra={"source": args.source, "part": args.part or part_name(args.input), "category": args.category,
               "lang": args.lang, "text_field": args.text_field},
    )
    bad = {k[len("dropped/"):]: v for k, v in stats.to_dict().items() if k.startswith("dropped/")}
    log.info("%s: %d records, %d kept, quarantined %s", args.input, stats["docs_in"], stats["docs_out"], bad)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("ingest", argv, _build, _run, "Validate a raw corpus file; quarantine bad records.")


if __name__ == "__main__":
    sys.exit(main())
