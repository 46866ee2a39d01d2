"""Saying why data went missing: the likeliest cause when most of a raw file is bad, and where a
category that ended empty lost its documents.

A wrong ``text_field``, a UTF-16 export or CR-only line endings each make 100 % of a file bad for
one reason, and the reason alone does not say what to do. ``sniff`` looks at the reasons ingest
counted and at the first 64 KiB of the file and names the cause with its fix; ingest logs it at
WARNING and records it in its manifest. ``why_empty`` walks the manifests upstream of a category's
files (``cptflow.core.provenance.upstream``) and names, per source file, the stage where the last
document went and why; the shards stage fails with it.
"""

from __future__ import annotations

import codecs
import gzip
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike

SNIFF_BYTES = 1 << 16
_UTF16_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
FUNNEL_STAGES = ("ingest", "clean", "dedup", "decontaminate", "pii")


def _head(path: PathLike) -> bytes:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except (OSError, EOFError):
        return b""


def sniff(path: PathLike, reasons: Mapping[str, int], details: Mapping[str, Counter[str]], text_field: str) -> str:
    """The likeliest cause of a mostly bad raw file, with what to do about it ("" if none stands out)."""
    name = Path(path).name
    if name.endswith(".parquet"):
        head = b""
    else:
        head = _head(path)
    if head.startswith(_UTF16_BOMS) or (head and head.count(b"\0") > len(head) // 10):
        return (f"{name} looks UTF-16/32 encoded (byte-order mark or NUL bytes), not UTF-8: convert it, e.g. "
                "`iconv -f UTF-16 -t UTF-8 in.jsonl > out.jsonl`")
    if b"\r" in head and b"\n" not in head:
        return (f"{name} has CR-only line endings (classic Mac), so it reads as one line: convert them, e.g. "
                "`tr '\\r' '\\n' < in.jsonl > out.jsonl`")
    if not reasons:
        return ""
    top, _ = Counter(reasons).most_common(1)[0]
    if top == "ingest_missing_field":
        fields = Counter(details.get(top, Counter())).most_common(1)
        if fields and fields[0][0] == "null":
            return f"field {text_field!r} is null in most records: is the source's text_field right?"
        seen = f" (records have {fields[0][0]})" if fields else ""
        return f"records have no field {text_field!r}{seen}: is the source's text_field right?"
    if top == "ingest_bad_utf8":
        try:
            codecs.getincrementaldecoder("gb18030")().decode(head, final=False)
        except UnicodeDecodeError:
            return f"{name} is not UTF-8: convert it to UTF-8"
        return f"{name} is not UTF-8 but decodes as GB18030/GBK: convert it, e.g. `iconv -f GB18030 -t UTF-8`"
    if top == "ingest_bad_json":
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            return f"{name} looks like one JSON array, not JSON Lines: convert it, e.g. `jq -c '.[]'`"
        return f"{name}: most lines are not JSON; is it JSON Lines (one object per line)?"
    if top == "ingest_not_string":
        return f"field {text_field!r} does not hold strings: is the source's text_field right?"
    if top == "ingest_empty_text":
        return f"field {text_field!r} is empty in most records: is the source's text_field right?"
    return ""


def _dropped(counts: Mapping[str, float]) -> str:
    reasons = {k.split("/", 1)[1]: int(v) for k, v in counts.items() if k.startswith("dropped/") and v}
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "no reason recorded"


def why_empty(category: str, manifests: Sequence[tuple[Path, dict[str, Any]]]) -> str:
    """Why ``category`` has no documents, from the manifests upstream of its files."""
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for _, m in manifests:
        by_stage.setdefault(m.get("stage", ""), []).append(m)
    lines = []
    for m in by_stage.get("ingest", []):
        c = m.get("counts", {})
        raw = next(iter(m.get("inputs") or {}), "?")
        if not c.get("docs_out"):
            cause = f": {m['diagnosis']}" if m.get("diagnosis") else ""
            lines.append(f"ingest kept 0 of {int(c.get('docs_in', 0))} records of {raw} ({_dropped(c)}){cause}")
    for stage in FUNNEL_STAGES[1:]:
        for m in by_stage.get(stage, []):
            c = m.get("counts", {})
            if c.get("docs_in") and not c.get("docs_out"):
                lines.append(f"{stage} dropped all {int(c['docs_in'])} documents of "
                             f"{next(iter(m.get('inputs') or {}), '?')} ({_dropped(c)})")
    head = f"category {category!r} ended with 0 documents"
    if not lines:
        return head + " (no upstream manifest says why; are its sources' files empty?)"
    return head + ":\n  " + "\n  ".join(lines)
