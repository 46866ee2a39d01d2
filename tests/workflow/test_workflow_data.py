"""The data stages as a user runs them: the real `snakemake` on a small config in a temporary dir."""

from __future__ import annotations

import gzip
import os
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DEMO, REPO
from support.workflow import jobs_run

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _lines(path: Path, start: int, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.readlines()[start : start + n]


def make_corpus(root: Path) -> dict[str, list[str]]:
    """Slices of the real demo corpus, one planted duplicate across files, and one malformed file."""
    corpus = root / "corpus"
    files = {
        "zh_web/cmrc.jsonl": _lines(DEMO / "corpus/zh_web/cmrc2018_dev.jsonl", 0, 25),
        "zh_web/bash.jsonl": _lines(DEMO / "corpus/zh_web/wangdoc_bash.jsonl", 0, 15),
        "zh_books/tang.jsonl": _lines(DEMO / "corpus/zh_books/tang300.jsonl", 0, 40),
        "zh_books/error.jsonl": _lines(DEMO / "corpus/zh_books/tang_error_0.jsonl", 0, 40),
        "en_replay/news.jsonl": _lines(DEMO / "corpus/en_replay/news_from_nowhere.jsonl", 10, 12),
    }
    # An exact duplicate of a zh_web document in another file (with full-width punctuation turned
    # half-width and extra spaces): dedup must find it across files.
    dup = json.loads(files["zh_web/cmrc.jsonl"][3])
    dup["text"] = dup["text"].replace("，", ",").replace("：", ":") + "  "
    files["zh_web/bash.jsonl"].append(json.dumps(dup, ensure_ascii=False) + "\n")
    for rel, lines in files.items():
        p = corpus / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(lines), encoding="utf-8")
    # Malformed input: broken JSON, missing field, bad UTF-8, empty text, between good lines (gzip).
    good = _lines(DEMO / "corpus/en_replay/devils_dictionary.jsonl", 5, 3)
    raw = (good[0].encode() + b'{"text": "unterminated\n' + b'{"title": "no text field"}\n'
           + good[1].encode() + b'{"text": "bad \xff\xfe utf8"}\n' + b'{"text": "   "}\n' + good[2].encode())
    with gzip.open(corpus / "en_replay" / "messy.jsonl.gz", "wb") as f:
        f.write(raw)
    return files


def snakemake(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = SNAKEMAKE + ["-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
                       str(workdir / "config.yaml"), "--cores", "2", "--printshellcmds", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf")
    make_corpus(work)
    shutil.copy(REPO / "tests" / "configs" / "data_small.yaml", work / "config.yaml")
    proc = snakemake(work, "funnel")
    return work, proc


def test_dry_run_lists_the_dag(tmp_path):
    make_corpus(tmp_path)
    shutil.copy(REPO / "tests" / "configs" / "data_small.yaml", tmp_path / "config.yaml")
    proc = snakemake(tmp_path, "funnel", "--dry-run")
    assert "ingest" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_data_stages_end_to_end(small_run):
    work, proc = small_run
    run = work / "results" / "small" / "data"
    funnel = json.loads((run / "funnel.json").read_text())
    stages = {s["stage"]: s for s in funnel["stages"]}
    assert list(stages)[:6] == ["ingest", "clean", "dedup", "decontaminate", "pii", "shards"]
    # Conservation at every stage: what comes in is kept or dropped with a reason.
    for s in funnel["stages"]:
        assert s["docs_in"] == s["docs_out"] + sum(s["dropped"].values()), s
    for a, b in zip(funnel["stages"][1:], funnel["stages"][2:]):
        assert b["docs_in"] == a["docs_out"]
    # The planted cross-file duplicate is gone, and the one copy is kept.
    assert stages["dedup"]["dropped"].get("dedup_exact", 0) >= 1
    # Shards hold exactly what the funnel says.
    total = 0
    for cat in ("zh_web", "zh_books", "en_replay"):
        n = sum(pq.read_table(p).num_rows for p in sorted((run / "shards" / cat).glob("*.parquet")))
        assert n == funnel["categories"][cat]["docs"] > 0
        total += n
    assert total == stages["shards"]["docs_out"]
    # The funnel is printed at the end of the run.
    assert "Data funnel" in proc.stderr
    # Lean intermediates: the documents between stages were zstd JSONL and are gone once consumed;
    # what a person inspects and what a rerun needs stays.
    for stage in ("ingest", "clean", "dedup/kept", "decontaminate", "pii"):
        left = [p for p in (run / stage).rglob("*.jsonl.zst") if not p.name.endswith(".dropped.jsonl.zst")]
        assert left == [], left
    assert len(list(run.glob("clean/*/*.dropped.jsonl.zst"))) == 6 and len(list(run.glob("shards/*/*.parquet"))) == 6
    assert len(list(run.glob("dedup/signatures/*/*.npz"))) == 6 and len(list(run.glob("ingest/*/*.quarantine.jsonl"))) == 6
    disk = {d["stage"]: d for d in funnel["disk"]["stages"]}
    raw = sum(p.stat().st_size for p in (work / "corpus").rglob("*") if p.is_file() and p.name != "song.jsonl")
    assert funnel["disk"]["input_bytes"] == raw
    assert 0 < disk["ingest"]["per_input_byte"] < 0.7 and not disk["ingest"]["documents_kept"]  # zstd
    assert disk["shards"]["documents_kept"] and "bytes written" in (run / "funnel.md").read_text()


def test_malformed_lines_are_quarantined_not_lost(small_run):
    work, _ = small_run
    q = work / "results/small/data/ingest/en_replay/messy.quarantine.jsonl"
    bad = [json.loads(line) for line in q.read_text().splitlines()]
    assert [b["line"] for b in bad] == [2, 3, 5, 6]
    assert [b["reason"] for b in bad] == ["ingest_bad_json", "ingest_missing_field", "ingest_bad_utf8", "ingest_empty_text"]
    assert all(b["file"].endswith("messy.jsonl.gz") for b in bad)
    kept = pq.read_table(work / "results/small/data/shards/en_replay/messy.parquet").column("id").to_pylist()
    assert kept == ["en_replay/messy:1", "en_replay/messy:4", "en_replay/messy:7"]


def test_same_input_gives_byte_identical_outputs(small_run, tmp_path):
    work, _ = small_run
    make_corpus(tmp_path)
    shutil.copy(REPO / "tests" / "configs" / "data_small.yaml", tmp_path / "config.yaml")
    snakemake(tmp_path, "funnel")
    a, b = work / "results/small/data", tmp_path / "results/small/data"
    compared = 0
    for f in sorted(a.rglob("*")):
        if f.is_file() and not f.name.endswith(".stats.json"):  # manifests hold timings
            assert (b / f.relative_to(a)).read_bytes() == f.read_bytes(), f.relative_to(a)
            compared += 1
    assert compared > 30


def test_adding_one_file_reruns_only_its_jobs_and_the_global_ones(small_run):
    work, _ = small_run
    extra = _lines(DEMO / "corpus/zh_books/song300.jsonl", 0, 30)
    (work / "corpus/zh_books/song.jsonl").write_text("".join(extra), encoding="utf-8")
    proc = snakemake(work, "funnel")
    jobs = jobs_run(proc)
    per_file = {(r, w) for r, w in jobs if "part=" in w}
    assert per_file == {(r, "source=zh_books, part=song") for r in
                        ("ingest", "clean", "signature", "dedup", "decontaminate", "pii", "shards")}, jobs
    global_rules = sorted(r for r, w in jobs if "part=" not in w)
    # bands (2 groups), clusters, the funnel, and the target: no other file's job, no intermediate remade.
    assert global_rules == sorted(["bands", "bands", "clusters", "funnel"]), jobs
    # A third run has nothing to do.
    proc = snakemake(work, "funnel")
    assert jobs_run(proc) == [] or "Nothing to be done" in proc.stderr


def _failed(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, "snakemake should have failed"
    return proc.stdout + proc.stderr


def test_truncated_intermediate_stops_the_run_naming_the_file(small_run, tmp_path):
    """Issue 14: an intermediate cut short and given back its mtime flowed on when the next stage reran
    (here: a signature file, kept between runs, read again by bands after a dedup setting changed)."""
    work = tmp_path / "copy"
    shutil.copytree(small_run[0], work, symlinks=True)  # copy2: mtimes kept, the run stays up to date
    sig = work / "results/small/data/dedup/signatures/zh_web/cmrc.npz"
    funnel_before = (work / "results/small/data/funnel.json").read_bytes()
    st = sig.stat()
    sig.write_bytes(sig.read_bytes()[:-64])
    os.utime(sig, ns=(st.st_atime_ns, st.st_mtime_ns))
    with open(work / "config.yaml", "a", encoding="utf-8") as f:
        f.write("  min_jaccard: 0.7\n")  # (under the dedup: section the file ends with)
    cmd = SNAKEMAKE + ["-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile",
                       str(work / "config.yaml"), "--cores", "2", "--show-failed-logs", "funnel"]
    out = _failed(subprocess.run(cmd, capture_output=True, text=True, timeout=900))
    assert "results/small/data/dedup/signatures/zh_web/cmrc.npz: differs from what dedup_signature wrote" in out
    assert (work / "results/small/data/funnel.json").read_bytes() == funnel_before  # nothing flowed on


def test_a_source_lost_whole_fails_the_run_naming_category_and_cause(tmp_path):
    """Issue 14: a UTF-16 file (or a wrong text_field, or CR-only line endings) quarantined 100 % of a
    source and the run still succeeded, with an empty shard and INFO lines only."""
    corpus = tmp_path / "corpus"
    for name, src in (("zh/a.jsonl", "zh_web/cmrc2018_dev.jsonl"), ("en/b.jsonl", "en_replay/news_from_nowhere.jsonl")):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text("".join(_lines(DEMO / "corpus" / src, 0, 12)), encoding="utf-8")
    (corpus / "en/b.jsonl").write_bytes((corpus / "en/b.jsonl").read_text(encoding="utf-8").encode("utf-16"))
    (tmp_path / "config.yaml").write_text(
        "run: lost\nsources:\n  - {name: zh, category: zh, paths: [corpus/zh/*.jsonl], lang: zh}\n"
        "  - {name: en, category: en, paths: [corpus/en/*.jsonl], lang: en}\n"
        "benchmarks: []\nheldout: {}\ndedup: {band_groups: 1}\n", encoding="utf-8")
    cmd = SNAKEMAKE + ["-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                       str(tmp_path / "config.yaml"), "--cores", "2", "--show-failed-logs", "--keep-going", "funnel"]
    out = _failed(subprocess.run(cmd, capture_output=True, text=True, timeout=900))
    assert "category 'en' ended with 0 documents" in out and "corpus/en/b.jsonl" in out and "UTF-16" in out
    assert "Error in rule funnel" in out and not (tmp_path / "results/lost/data/funnel.json").exists()
    assert pq.read_table(tmp_path / "results/lost/data/shards/en/b.parquet").num_rows == 0  # counted, empty
    assert pq.read_table(tmp_path / "results/lost/data/shards/zh/a.parquet").num_rows > 0


@pytest.mark.parametrize("keep", [False, True])
def test_keep_intermediates_keeps_the_documents_between_stages(tmp_path, keep):
    """Ingest's documents are a temp() file that clean consumes: gone after clean unless keep_intermediates."""
    make_corpus(tmp_path)
    shutil.copy(REPO / "tests" / "configs" / "data_small.yaml", tmp_path / "config.yaml")
    run = tmp_path / "results/small/data"
    snakemake(tmp_path, "results/small/data/clean/en_replay/messy.jsonl.zst", "--config", f"keep_intermediates={keep}")
    assert (run / "clean/en_replay/messy.jsonl.zst").is_file()  # the target itself is kept
    assert (run / "ingest/en_replay/messy.jsonl.zst").is_file() == keep
    assert (run / "ingest/en_replay/messy.quarantine.jsonl").is_file()  # always kept
