"""The funnel: documents in / kept / dropped per stage, and every stage's input checked against what
the stage before it wrote."""

from __future__ import annotations

import json

import pytest

from cptflow.data import funnel


def _m(stage: str, inputs: list[str], outputs: list[str], docs_in: int, docs_out: int) -> dict:
    return {"stage": stage, "inputs": {p: "0" * 64 for p in inputs}, "outputs": {p: "0" * 64 for p in outputs},
            "params": {"category": "c"}, "counts": {"docs_in": docs_in, "docs_out": docs_out,
                                                    "dropped/x": docs_in - docs_out}}


def _write(tmp_path, manifests: dict[str, dict]) -> list[str]:
    paths = []
    for name, m in manifests.items():
        (tmp_path / name).write_text(json.dumps(m))
        paths.append(str(tmp_path / name))
    return paths


def _chain(clean_in: int) -> dict[str, dict]:
    return {
        "ingest.stats.json": _m("ingest", ["raw/a.jsonl"], ["ingest/a.jsonl", "ingest/a.quarantine.jsonl"], 10, 9),
        "clean.stats.json": _m("clean", ["ingest/a.jsonl"], ["clean/a.jsonl", "clean/a.dropped.jsonl"], clean_in, 7),
        "pii.stats.json": _m("pii", ["./clean/a.jsonl"], ["pii/a.jsonl"], 7, 7),
        "pii_b.stats.json": _m("pii", ["clean/b.jsonl"], ["pii/b.jsonl"], 3, 3),
        "shards.stats.json": _m("shards", ["pii/a.jsonl", "pii/b.jsonl"], ["shards/c"], 10, 10),
    }


def test_funnel_sums_stages_and_checks_each_file_continues(tmp_path):
    paths = _write(tmp_path, _chain(clean_in=9))
    out = funnel.run(paths, str(tmp_path / "f.json"), str(tmp_path / "f.md"))
    assert [(s["stage"], s["docs_in"], s["docs_out"]) for s in out["stages"]] == [
        ("ingest", 10, 9), ("clean", 9, 7), ("pii", 10, 10), ("shards", 10, 10)]
    assert out["categories"] == {"c": {"docs": 10, "chars": 0}}


def test_funnel_fails_when_a_stage_read_other_than_its_producer_wrote(tmp_path):
    """Issue 14: the funnel did not notice one stage's docs_out != the next one's docs_in for a file."""
    paths = _write(tmp_path, _chain(clean_in=8))
    with pytest.raises(ValueError, match=r"clean read 8 documents from ingest/a.jsonl .* but ingest wrote 9"):
        funnel.run(paths, str(tmp_path / "f.json"), str(tmp_path / "f.md"))
    assert not (tmp_path / "f.json").exists()
    assert funnel.main(["--stats", *paths, "--output-json", str(tmp_path / "f.json"),
                        "--output-md", str(tmp_path / "f.md")]) == 2


def test_funnel_reports_bytes_per_input_byte_and_an_empty_file_is_only_counted(tmp_path):
    chain = _chain(clean_in=9)
    chain["ingest.stats.json"]["counts"]["bytes_in"] = 1000
    chain["ingest.stats.json"]["output_bytes"] = {"ingest/a.jsonl": 400, "ingest/a.quarantine.jsonl": 10}
    chain["clean.stats.json"]["output_bytes"] = {"clean/a.jsonl": 300, "clean/a.dropped.jsonl": 50}
    chain["shards.stats.json"]["output_bytes"] = {"shards/c": 200}
    chain["shards_empty.stats.json"] = _m("shards", ["pii/e.jsonl"], ["shards/e.parquet"], 0, 0)  # same category c
    out = funnel.run(_write(tmp_path, chain), str(tmp_path / "f.json"), str(tmp_path / "f.md"), temporary=["ingest"])
    rows = {s["stage"]: s for s in out["disk"]["stages"]}
    assert out["disk"]["input_bytes"] == 1000
    assert (rows["ingest"]["bytes_written"], rows["ingest"]["per_input_byte"], rows["ingest"]["documents_kept"]) == \
        (410, 0.41, False)
    assert (rows["clean"]["per_input_byte"], rows["shards"]["per_input_byte"]) == (0.35, 0.2)
    assert "| ingest | 410 | 0.410 | no (temporary) |" in (tmp_path / "f.md").read_text()


def test_funnel_fails_naming_a_category_left_with_no_document(tmp_path):
    chain = _chain(clean_in=9)
    chain["shards_d.stats.json"] = {**_m("shards", ["pii/d.jsonl"], ["shards/d.parquet"], 0, 0), "params": {"category": "d"}}
    with pytest.raises(ValueError, match="category 'd' ended with 0 documents"):
        funnel.run(_write(tmp_path, chain), str(tmp_path / "f.json"), str(tmp_path / "f.md"))
