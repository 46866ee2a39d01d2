"""Ingest: every raw record is either written in the intermediate format or quarantined with file,
line and reason; broken files fail loudly without leaving outputs."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import schema_section, DEMO, REPO

from cptflow.config import ConfigError, from_dict, to_dict
from cptflow.ingest import IngestConfig, main, parse_line, part_name, run

CORPUS = DEMO / "corpus"


def _lines(rel: str, n: int) -> list[bytes]:
    return (CORPUS / rel).read_bytes().splitlines(keepends=True)[:n]


def _messy_bytes() -> bytes:
    good = _lines("en_replay/devils_dictionary.jsonl", 4)
    return b"".join([
        b"\xef\xbb\xbf" + good[0],                   # 1 good (UTF-8 BOM from an editor)
        b'{"text": "unterminated\n',                 # 2 bad json
        b'{"title": "no text field"}\n',             # 3 missing field
        good[1].replace(b"\n", b"\r\n"),             # 4 good (CRLF)
        b'{"text": "bad \xff\xfe utf8"}\n',          # 5 bad utf-8
        b'{"text": "   "}\n',                        # 6 empty text
        b"\n",                                       # 7 blank line: skipped, not a record
        b'["a list"]\n',                             # 8 not an object
        b'{"text": 42}\n',                           # 9 not a string
        b'{"text": null}\n',                         # 10 null counts as missing
        b'{"text": "lone \\ud800 surrogate"}\n',     # 11 cannot be written as UTF-8
        good[2],                                     # 12 good
        good[3].rstrip(b"\n"),                       # 13 good, no final newline
    ])


def _run(tmp_path, raw_name: str, **kw):
    out, q = tmp_path / "out.jsonl", tmp_path / "q.jsonl"
    stats = run(IngestConfig(**kw.pop("cfg", {})), tmp_path / raw_name, out, q,
                source=kw.pop("source", "en_replay"), category="en_replay", lang="en", **kw)
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    return stats, docs, [json.loads(x) for x in q.read_text().splitlines()]


@pytest.mark.parametrize("name", ["messy.jsonl", "messy.jsonl.gz"])
def test_bad_lines_are_quarantined_with_reason_and_good_ones_kept(tmp_path, name):
    raw = _messy_bytes()
    (tmp_path / name).write_bytes(gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw)
    stats, docs, bad = _run(tmp_path, name)
    assert [(b["line"], b["reason"]) for b in bad] == [
        (2, "ingest_bad_json"), (3, "ingest_missing_field"), (5, "ingest_bad_utf8"), (6, "ingest_empty_text"),
        (8, "ingest_not_object"), (9, "ingest_not_string"), (10, "ingest_missing_field"), (11, "ingest_bad_utf8"),
    ]
    assert all(b["file"].endswith(name) for b in bad)
    assert bad[2]["excerpt"] == '{"text": "bad \ufffd\ufffd utf8"}'
    assert [d["id"] for d in docs] == [f"en_replay/messy:{i}" for i in (1, 4, 12, 13)]
    originals = [json.loads(x)["text"] for x in _lines("en_replay/devils_dictionary.jsonl", 4)]
    assert [d["text"] for d in docs] == originals
    assert list(docs[0]) == ["id", "text", "source", "category", "lang"]
    assert (docs[0]["source"], docs[0]["category"], docs[0]["lang"]) == ("en_replay", "en_replay", "en")
    c = stats.to_dict()
    assert c["docs_in"] == 12 and c["docs_out"] == 4 and c["skipped/ingest_empty_line"] == 1
    assert c["docs_in"] == c["docs_out"] + sum(v for k, v in c.items() if k.startswith("dropped/"))
    assert c["chars_in"] == c["chars_out"] + sum(v for k, v in c.items() if k.startswith("dropped_chars/"))
    assert c["dropped/ingest_missing_field"] == 2 and c["dropped/ingest_bad_utf8"] == 2


def test_real_demo_file_passes_through_unchanged(tmp_path):
    src = CORPUS / "zh_books/tang300.jsonl"
    (tmp_path / "tang300.jsonl").write_bytes(src.read_bytes())
    stats, docs, bad = _run(tmp_path, "tang300.jsonl", source="zh_books")
    assert bad == [] and stats["docs_out"] == len(docs) == 366
    assert docs[1]["id"] == "zh_books/tang300:2"
    assert [d["text"] for d in docs] == [json.loads(x)["text"] for x in src.read_text(encoding="utf-8").splitlines()]


def test_parquet_rows_are_records(tmp_path):
    texts = [json.loads(x)["text"] for x in _lines("zh_web/cmrc2018_dev.jsonl", 3)]
    table = pa.table({"content": texts[:2] + [None, "", texts[2]], "n": [1, 2, 3, 4, 5]})
    pq.write_table(table, tmp_path / "wiki.parquet")
    stats, docs, bad = _run(tmp_path, "wiki.parquet", text_field="content", source="zh_web")
    assert [d["id"] for d in docs] == ["zh_web/wiki:1", "zh_web/wiki:2", "zh_web/wiki:5"]
    assert [d["text"] for d in docs] == texts
    assert [(b["line"], b["reason"]) for b in bad] == [(3, "ingest_missing_field"), (4, "ingest_empty_text")]
    with pytest.raises(ValueError, match=r"wiki.parquet: no column 'text' \(columns: content, n\)"):
        _run(tmp_path, "wiki.parquet")


def test_truncated_gzip_fails_naming_the_file_and_writes_nothing(tmp_path):
    data = gzip.compress((CORPUS / "zh_web/rust_book_cn.jsonl").read_bytes(), mtime=0)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: truncated or corrupt gzip"):
        _run(tmp_path, "cut.jsonl.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl.gz"]  # no partial output, no temporaries


def test_max_bad_fraction_fails_a_file_that_is_mostly_bad(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(_messy_bytes())
    with pytest.raises(ValueError, match=r"m.jsonl: 8 of 12 records are bad.*first: line 2: ingest_bad_json"):
        _run(tmp_path, "m.jsonl", cfg={"max_bad_fraction": 0.5})
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "q.jsonl").exists()
    _run(tmp_path, "m.jsonl", cfg={"max_bad_fraction": 0.7})  # 8/12 is under this limit


def test_cli_writes_manifest_and_reports_errors(tmp_path, capsys):
    raw = tmp_path / "ci.song.0.jsonl.gz"
    raw.write_bytes(gzip.compress(b"".join(_lines("zh_books/ci_song_0.jsonl", 20)), mtime=0))
    argv = ["--input", str(raw), "--output", str(tmp_path / "o.jsonl"), "--quarantine", str(tmp_path / "q.jsonl"),
            "--stats", str(tmp_path / "s.json"), "--source", "zh_books", "--category", "zh_books", "--lang", "zh",
            "--params", json.dumps({"max_excerpt_chars": 50}), "--log", str(tmp_path / "ingest.log")]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "s.json").read_text())
    assert manifest["stage"] == "ingest" and manifest["params"] == {"max_excerpt_chars": 50, "max_bad_fraction": 1.0}
    assert manifest["counts"]["docs_out"] == 20 and manifest["part"] == "ci.song.0"
    first = json.loads((tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["id"] == "zh_books/ci.song.0:1"
    first_bytes = (tmp_path / "o.jsonl").read_bytes()
    assert main(argv) == 0 and (tmp_path / "o.jsonl").read_bytes() == first_bytes  # deterministic
    assert main([*argv[:-4], "--params", '{"max_excerpt": 5}']) == 2
    assert "unknown key(s) max_excerpt" in capsys.readouterr().err


def test_parse_line_and_part_name():
    assert parse_line(b'{"body": "x"}\n', "body") == ("x", None)
    assert parse_line(b"  \r\n", "text") == (None, "ingest_empty_line")
    assert part_name("a/ci.song.0.jsonl.gz") == "ci.song.0" and part_name("x.parquet") == "x"


def test_config_and_schema_fragment_agree():
    schema = schema_section("ingest")
    assert {k: v["default"] for k, v in schema["properties"].items()} == to_dict(IngestConfig())
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        from_dict(IngestConfig, {"max_bad_fraction": 2}, "ingest")
