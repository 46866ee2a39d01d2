"""Stages check what they read (cptflow.core.provenance): an input that differs from what its
producer's manifest recorded is an error naming the file, however it was changed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from conftest import DEMO
from cptflow.core.provenance import InputMismatch, find_record, sibling_manifests, upstream, verify_inputs
from cptflow.core.stats import Stats, write_manifest
from cptflow.data import clean, ingest


def _ingest(tmp_path: Path, n: int = 30) -> tuple[Path, Path]:
    raw = tmp_path / "corpus" / "web.jsonl"
    raw.parent.mkdir()
    raw.write_bytes(b"".join((DEMO / "corpus/zh_web/cmrc2018_dev.jsonl").read_bytes().splitlines(keepends=True)[:n]))
    out = tmp_path / "ingest" / "web.jsonl"
    assert ingest.main(["--input", str(raw), "--output", str(out), "--quarantine", str(tmp_path / "ingest/web.quarantine.jsonl"),
                        "--stats", str(tmp_path / "ingest/web.stats.json"), "--source", "zh_web", "--category", "zh_web",
                        "--lang", "zh"]) == 0
    return raw, out


def _clean(tmp_path: Path, docs: Path, log: Path) -> int:
    return clean.main(["--input", str(docs), "--output", str(tmp_path / "clean/web.jsonl"), "--dropped",
                       str(tmp_path / "clean/web.dropped.jsonl"), "--stats", str(tmp_path / "clean/web.stats.json"),
                       "--log", str(log)])


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["cut", "cut_and_mtime_restored"])
def test_truncated_intermediate_is_refused_naming_the_file(tmp_path, keep_mtime):
    """Issue 14: an intermediate cut at a line boundary (or cut and given back its mtime) flowed on:
    documents lost with exit code 0. Now the next stage fails naming the file and its manifest."""
    _, docs = _ingest(tmp_path)
    st = docs.stat()
    lines = docs.read_bytes().splitlines(keepends=True)
    docs.write_bytes(b"".join(lines[:20]))  # a clean cut: every remaining line is valid JSON
    if keep_mtime:
        os.utime(docs, ns=(st.st_atime_ns, st.st_mtime_ns))
    log = tmp_path / "clean.log"
    assert _clean(tmp_path, docs, log) == 2
    text = log.read_text(encoding="utf-8")
    assert f"{docs}: differs from what ingest wrote (manifest {tmp_path / 'ingest/web.stats.json'}" in text
    assert "truncated or changed" in text and not (tmp_path / "clean/web.jsonl").exists()


def test_same_size_change_is_caught_by_sha256(tmp_path):
    _, docs = _ingest(tmp_path)
    data = bytearray(docs.read_bytes())
    i = data.index(b"\xe7")  # change one byte of one character, keeping the size and valid UTF-8 structure
    data[i + 2] ^= 1
    docs.write_bytes(bytes(data))
    with pytest.raises(InputMismatch, match=r"sha256 [0-9a-f]{64}\)"):
        verify_inputs([docs])


def test_intact_inputs_pass_and_unknown_files_are_read_unchecked(tmp_path, caplog):
    raw, docs = _ingest(tmp_path)
    assert verify_inputs([docs, tmp_path / "ingest/web.quarantine.jsonl"]) == 2
    with caplog.at_level(logging.WARNING, logger="cptflow.core.provenance"):
        assert verify_inputs([raw]) == 0  # a user's file: nothing recorded it
    assert "no manifest lists this file" in caplog.text
    assert _clean(tmp_path, docs, tmp_path / "clean.log") == 0


def test_explicit_manifest_and_the_naming_convention(tmp_path):
    assert sibling_manifests("d/zh/ci.song.0.dropped.jsonl")[:3] == [
        Path("d/zh/ci.song.0.dropped.stats.json"), Path("d/zh/ci.song.0.stats.json"), Path("d/zh/ci.song.stats.json")]
    assert sibling_manifests("data/shards/zh_web") == [Path("data/shards/zh_web.stats.json")]
    out = tmp_path / "drop" / "a.jsonl"
    out.parent.mkdir()
    out.write_text('{"id": "x"}\n')
    manifest = tmp_path / "clusters.stats.json"
    write_manifest(manifest, stage="dedup_clusters", version=1, params={}, inputs=[], stats=Stats(), seconds=0,
                   outputs=[out])
    assert find_record(out) is None  # not where the convention looks
    assert find_record(out, [manifest])[0] == manifest
    assert verify_inputs([out], [manifest]) == 1
    out.write_text('{"id": "y"}\n')
    with pytest.raises(InputMismatch, match="dedup_clusters"):
        verify_inputs([out], [manifest])


def test_upstream_walks_the_chain_of_manifests(tmp_path):
    _, docs = _ingest(tmp_path)
    assert _clean(tmp_path, docs, tmp_path / "clean.log") == 0
    chain = upstream([tmp_path / "clean/web.jsonl"])
    assert [m["stage"] for _, m in chain] == ["clean", "ingest"]
    assert json.loads((tmp_path / "ingest/web.stats.json").read_text())["output_bytes"][str(docs)] == docs.stat().st_size


def test_a_directory_output_still_matches_after_snakemake_touches_its_timestamp(tmp_path):
    """Snakemake writes an empty .snakemake_timestamp into every directory() output after the job,
    i.e. after the manifest: it is not content and must not make the directory 'differ'."""
    out = tmp_path / "shards" / "zh"
    out.mkdir(parents=True)
    (out / "part-00000.parquet").write_bytes(b"PAR1 data PAR1")
    write_manifest(tmp_path / "shards" / "zh.stats.json", stage="shards", version=1, params={}, inputs=[],
                   stats=Stats(), seconds=0, outputs=[out])
    (out / ".snakemake_timestamp").write_bytes(b"")
    assert verify_inputs([out]) == 1
    (out / "part-00001.parquet").write_bytes(b"")  # a real extra file (even an empty one) is a difference
    with pytest.raises(InputMismatch, match="differs from what shards wrote"):
        verify_inputs([out])
