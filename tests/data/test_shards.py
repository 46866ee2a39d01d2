"""Shards: each file's surviving documents as parquet; an empty file is an empty shard, and a category
left with none fails the funnel, which says where its documents went."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DEMO
from cptflow.data import clean, funnel, ingest, shards


def _chain(tmp_path: Path, raw: bytes, text_field: str = "text", clean_params: dict | None = None) -> Path:
    """ingest → clean of one raw file, laid out as the workflow does (manifests beside outputs)."""
    src = tmp_path / "corpus" / "web.jsonl"
    src.parent.mkdir(parents=True)
    src.write_bytes(raw)
    d = tmp_path / "data"
    assert ingest.main(["--input", str(src), "--output", str(d / "ingest/web.jsonl"), "--quarantine",
                        str(d / "ingest/web.quarantine.jsonl"), "--stats", str(d / "ingest/web.stats.json"),
                        "--source", "zh_web", "--category", "zh_web", "--lang", "zh", "--text-field", text_field]) == 0
    assert clean.main(["--input", str(d / "ingest/web.jsonl"), "--output", str(d / "clean/web.jsonl"), "--dropped",
                       str(d / "clean/web.dropped.jsonl"), "--stats", str(d / "clean/web.stats.json"),
                       "--params", json.dumps(clean_params or {})]) == 0
    return d / "clean/web.jsonl"


def _shards(tmp_path: Path, docs: Path) -> int:
    return shards.main(["--category", "zh_web", "--input", str(docs), "--output", str(tmp_path / "shards/web.parquet"),
                        "--stats", str(tmp_path / "shards/web.stats.json"), "--params", '{"batch_docs": 5}'])


def _funnel(tmp_path: Path, log: Path) -> int:
    stats = [str(p) for p in sorted((tmp_path / "data").rglob("*.stats.json"))] + [str(tmp_path / "shards/web.stats.json")]
    with open(log, "w", encoding="utf-8") as err, contextlib.redirect_stderr(err):
        return funnel.main(["--stats", *stats, "--output-json", str(tmp_path / "f.json"),
                            "--output-md", str(tmp_path / "f.md")])


RAW = b"".join((DEMO / "corpus/zh_web/cmrc2018_dev.jsonl").read_bytes().splitlines(keepends=True)[:12])


def test_a_shard_holds_every_document_in_order_in_row_groups(tmp_path):
    docs = _chain(tmp_path, RAW)
    assert _shards(tmp_path, docs) == 0
    pf = pq.ParquetFile(tmp_path / "shards/web.parquet")
    rows = pf.read().to_pylist()
    assert [r["id"] for r in rows] == [json.loads(x)["id"] for x in docs.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12 and pf.num_row_groups == 3  # batch_docs 5: 5 + 5 + 2
    assert pf.schema_arrow.metadata[b"cptflow.category"] == b"zh_web"
    assert _funnel(tmp_path, tmp_path / "f.log") == 0


@pytest.mark.parametrize("case, raw, field, expect", [
    ("wrong text_field", RAW, "content", "records have no field 'content' (records have fields: source, text)"),
    ("UTF-16", RAW.decode("utf-8").encode("utf-16"), "text", "looks UTF-16/32 encoded"),
    ("CR-only", RAW.replace(b"\n", b"\r"), "text", "CR-only line endings"),
])
def test_a_category_lost_whole_fails_naming_it_and_the_likeliest_cause(tmp_path, case, raw, field, expect):
    """Issue 14: a wrong text_field, a UTF-16 file or CR-only line endings quarantined 100 % of a source
    and the run succeeded with an empty shard. The file's shard is empty (counted), and the funnel fails
    (exit 2), naming the category, the file, the reasons and the cause."""
    docs = _chain(tmp_path, raw, field)
    assert _shards(tmp_path, docs) == 0
    assert pq.read_table(tmp_path / "shards/web.parquet").num_rows == 0
    log = tmp_path / "funnel.log"
    assert _funnel(tmp_path, log) == 2
    text = log.read_text(encoding="utf-8")
    assert "category 'zh_web' ended with 0 documents" in text, case
    assert "web.jsonl" in text and "ingest kept 0 of" in text and expect in text, text
    assert not (tmp_path / "f.json").exists()


def test_a_category_emptied_by_a_filter_names_the_stage_and_reason(tmp_path):
    docs = _chain(tmp_path, RAW, clean_params={"min_chars": 100_000, "max_chars": None})
    assert _shards(tmp_path, docs) == 0
    log = tmp_path / "funnel.log"
    assert _funnel(tmp_path, log) == 2
    assert "clean dropped all 12 documents" in log.read_text() and "clean_too_short 12" in log.read_text()
