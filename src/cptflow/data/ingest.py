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
part of ``docs_in``, so ``docs_in == docs_out + sum(dropped/*)`` always holds. Any exception while
decoding or validating a record quarantines that record (``ingest_bad_record`` when it is none of the
above, with the message as ``detail``; ``cptflow.data.raw_records``). A truncated or corrupt gzip is
a broken file rather than a bad record: it raises an error naming the file and no output is written
(the outputs are atomic). Parquet is read column-wise; a row is a record, its 1-based row number is
its "line", and a missing column is an error naming the columns that exist.

A file whose bad share exceeds ``warn_bad_fraction`` (default a half) gets a WARNING with the
likeliest cause (wrong ``text_field``, UTF-16, CR-only line endings, GBK, a JSON array:
``cptflow.data.diagnose``), also recorded in the manifest as ``diagnosis``; a category that ends
with no documents at all fails in the shards stage, which repeats that cause.

``chars_in`` counts the text of good records plus the characters of each bad line (so
``chars_in == chars_out + sum(dropped_chars/*)``); ``bytes_in`` is the input file's size on disk.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cptflow.core.cli import stage_main
from cptflow.core.config import ConfigError, from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path, dumps_record, open_text
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.data.diagnose import sniff
from cptflow.data.raw_records import (  # noqa: F401 - parse_line, check_value: the per-record API
    JSONL_SUFFIXES, PARQUET_SUFFIXES, check_value, iter_raw_records, parse_line,
)

# 2: every per-record exception quarantined, quarantine records carry "detail"
VERSION = 3
log = logging.getLogger("cptflow.data.ingest")


@dataclass(frozen=True)
class IngestConfig:
    """Settings of the ingest stage (config section ``ingest:``)."""

    max_excerpt_chars: int = 200  # quarantine excerpt: enough to recognise the line, small enough to skim
    max_bad_fraction: float = 1.0  # fail the file if a larger share of its records is bad; 1.0 = never
    warn_bad_fraction: float = 0.5  # warn, naming the likeliest cause, if a larger share is bad
    # A longer line is quarantined unread: no document is that long (clean.max_chars is 200,000), and
    # a file without newlines would otherwise be held in memory whole.
    max_line_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_excerpt_chars < 0:
            raise ConfigError("ingest.max_excerpt_chars must be >= 0")
        for name in ("max_bad_fraction", "warn_bad_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"ingest.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_line_bytes < 1:
            raise ConfigError(f"ingest.max_line_bytes must be >= 1, got {self.max_line_bytes}")


def part_name(path: PathLike) -> str:
    """The file name without its known extension(s): ``ci.song.0.jsonl.gz`` → ``ci.song.0``."""
    name = Path(path).name
    for suffix in sorted(JSONL_SUFFIXES + PARQUET_SUFFIXES + (".json",), key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class IngestResult(NamedTuple):
    stats: Stats
    diagnosis: str  # likeliest cause when more than warn_bad_fraction of the records are bad, else ""


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
) -> IngestResult:
    """Validate one raw file; write good records (intermediate format) and the quarantine, atomically."""
    part = part or part_name(input_path)
    stats = Stats()
    stats.update("bytes_in", Path(input_path).stat().st_size)  # on disk (compressed for .gz)
    first_bad: str | None = None
    reasons: Counter[str] = Counter()
    details: dict[str, Counter[str]] = defaultdict(Counter)
    with atomic_path(output) as tmp_out, atomic_path(quarantine) as tmp_q:
        with open_text(tmp_out, "w", like=output) as fo, open_text(tmp_q, "w", like=quarantine) as fq:
            for line, text, reason, bad, detail in iter_raw_records(input_path, text_field, cfg.max_line_bytes):
                if reason == "ingest_empty_line":
                    stats.update("skipped/ingest_empty_line")
                    continue
                stats.update("docs_in")
                if reason is not None:
                    stats.update("chars_in", len(bad))
                    stats.drop(reason, len(bad))
                    reasons[reason] += 1
                    if len(details[reason]) < 100:
                        details[reason][detail] += 1
                    rec = {"file": str(input_path), "line": line, "reason": reason,
                           "excerpt": bad[: cfg.max_excerpt_chars]}
                    if detail:
                        rec["detail"] = detail
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
        n_in, n_bad = int(stats["docs_in"]), int(stats["docs_in"] - stats["docs_out"])
        diagnosis = ""
        if not n_in:
            diagnosis = "no records: the file is empty or holds blank lines only"
            log.warning("%s: %s", input_path, diagnosis)
        elif n_bad / n_in > cfg.warn_bad_fraction:
            diagnosis = sniff(input_path, reasons, details, text_field)
            top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
            log.warning("%s: %d of %d records (%.0f %%) are bad (%s)%s", input_path, n_bad, n_in,
                        100 * n_bad / n_in, top, f"; likely cause: {diagnosis}" if diagnosis else "")
        if n_in and n_bad / n_in > cfg.max_bad_fraction:
            raise ValueError(
                f"{input_path}: {n_bad} of {n_in} records are bad, more than max_bad_fraction "
                f"{cfg.max_bad_fraction} (first: {first_bad}){'; ' + diagnosis if diagnosis else ''}"
            )
    return IngestResult(stats, diagnosis)


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
        stats, diagnosis = run(
            cfg, args.input, args.output, args.quarantine, source=args.source, category=args.category,
            lang=args.lang, part=args.part, text_field=args.text_field,
        )
    write_manifest(
        args.stats, stage="ingest", version=VERSION, params=to_dict(cfg), inputs=[args.input], stats=stats,
        seconds=t.seconds, outputs=[args.output, args.quarantine],
        extra={"source": args.source, "part": args.part or part_name(args.input), "category": args.category,
               "lang": args.lang, "text_field": args.text_field, "diagnosis": diagnosis},
    )
    bad = stats.under("dropped")
    log.info("%s: %d records, %d kept, quarantined %s", args.input, stats["docs_in"], stats["docs_out"], bad)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("ingest", argv, _build, _run, "Validate a raw corpus file; quarantine bad records.")


if __name__ == "__main__":
    sys.exit(main())
