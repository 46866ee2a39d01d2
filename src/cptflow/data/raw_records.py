"""Reading raw corpus files record by record, for the ingest stage: every record is parsed or rejected.

A raw file is untrusted, so no record may raise out of here: whatever goes wrong decoding or
validating one record (bytes that are not UTF-8, JSON that does not parse, a 5,000-digit integer
that Python refuses to convert, nesting deeper than the parser's recursion limit, any other
exception) becomes that record's reason, with the exception's message as ``detail``. Only a broken
*file* raises (a truncated gzip, an unreadable parquet): then nothing is written.

A line longer than ``max_line_bytes`` is rejected as ``ingest_line_too_long`` and skipped in chunks,
never held in memory whole: a file without newlines (or with CR-only line endings) would otherwise
be read as one line of the file's size.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from cptflow.core.io import PathLike

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_CHUNK = 1 << 20  # skipping an over-long line reads this much at a time
_MAX_DETAIL = 200  # characters of an exception message kept in the quarantine


class Parsed(NamedTuple):
    """One raw record: its text, or the reason it was rejected (and what exactly went wrong)."""

    text: str | None
    reason: str | None
    detail: str = ""


class RawRecord(NamedTuple):
    line: int  # 1-based line (JSONL) or row (parquet)
    text: str | None
    reason: str | None
    bad: str  # the rejected line (or value) as text; "" for good records
    detail: str


def _detail(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:_MAX_DETAIL]


def check_value(value: Any, present: bool = True) -> Parsed:
    """The text of a usable text value, else the reason it is not."""
    if not present or value is None:
        return Parsed(None, "ingest_missing_field")
    if not isinstance(value, str):
        return Parsed(None, "ingest_not_string", f"a {type(value).__name__}")
    if not value.strip():
        return Parsed(None, "ingest_empty_text")
    if _SURROGATE_RE.search(value):
        return Parsed(None, "ingest_bad_utf8", "a lone surrogate escape (\\ud800-\\udfff)")
    return Parsed(value, None)


def parse_line(raw: bytes, text_field: str) -> Parsed:
    """Parse one raw JSONL line. Blank lines give ``ingest_empty_line``; nothing raises."""
    if not raw.strip():
        return Parsed(None, "ingest_empty_line")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Parsed(None, "ingest_bad_utf8", _detail(e))
    try:
        obj = json.loads(line.lstrip("\ufeff"))  # a BOM on the first line is an editor artefact
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int digits limit, deep nesting
        return Parsed(None, "ingest_bad_json", _detail(e))
    if not isinstance(obj, dict):
        return Parsed(None, "ingest_not_object", f"a JSON {type(obj).__name__}")
    parsed = check_value(obj.get(text_field), text_field in obj)
    if parsed.reason == "ingest_missing_field" and text_field in obj:
        return parsed._replace(detail="null")
    if parsed.reason == "ingest_missing_field":
        fields = sorted(map(str, obj))
        shown = ", ".join(fields[:10]) + (", ..." if len(fields) > 10 else "")
        return parsed._replace(detail=f"fields: {shown}" if fields else "an empty object")
    return parsed


def _lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(line, too_long) per line; an over-long line yields its first ``max_line_bytes`` only."""
    while raw := f.readline(max_line_bytes + 1):
        if len(raw) <= max_line_bytes or raw.endswith(b"\n"):
            yield raw, False
            continue
        while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield raw[:max_line_bytes], True


def _iter_jsonl(path: Path, text_field: str, max_line_bytes: int) -> Iterator[RawRecord]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, (raw, too_long) in enumerate(_lines(f, max_line_bytes), 1):
                if too_long:
                    bad = raw[:_MAX_DETAIL].decode("utf-8", errors="replace")
                    yield RawRecord(lineno, None, "ingest_line_too_long", bad, f"longer than {max_line_bytes} bytes")
                    continue
                try:
                    text, reason, detail = parse_line(raw, text_field)
                except Exception as e:  # noqa: BLE001 - one record never stops the file
                    text, reason, detail = None, "ingest_bad_record", _detail(e)
                bad = raw.rstrip(b"\r\n").decode("utf-8", errors="replace") if reason else ""
                yield RawRecord(lineno, text, reason, bad, detail)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({e}); re-fetch or re-compress it") from e


def _iter_parquet(path: Path, text_field: str) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            column = batch.column(0)
            try:
                values = column.to_pylist()
            except Exception:  # noqa: BLE001 - convert row by row to find the bad ones
                values = None
            for i in range(len(column)):
                row += 1
                try:
                    value = values[i] if values is not None else column[i].as_py()
                    text, reason, detail = check_value(value)
                except Exception as e:  # noqa: BLE001
                    value, text, reason, detail = None, None, "ingest_bad_record", _detail(e)
                bad = "" if value is None or text is not None else str(value)
                yield RawRecord(row, text, reason, bad, detail)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read parquet file ({e})") from e


def iter_raw_records(path: PathLike, text_field: str, max_line_bytes: int) -> Iterator[RawRecord]:
    """Every record of a raw ``.jsonl(.gz)`` or ``.parquet`` file, parsed or with its reason."""
    p = Path(path)
    if p.name.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(p, text_field)
    elif p.name.endswith(JSONL_SUFFIXES):
        yield from _iter_jsonl(p, text_field, max_line_bytes)
    else:
        raise ValueError(f"{p}: unsupported input type (expected {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})")
