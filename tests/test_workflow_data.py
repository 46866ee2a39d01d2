"""The data stages as a user runs them: the real `snakemake` on a small config in a temporary dir."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DEMO, REPO

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


def jobs_run(proc: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job Snakemake started, from its own log."""
    out, rule = [], None
    for line in proc.stderr.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            if rule:
                out.append((rule, ""))
            rule = m.group(1)
            continue
        m = re.match(r"^\s+wildcards: (.*)$", line)
        if m and rule:
            out.append((rule, m.group(1)))
            rule = None
    if rule:
        out.append((rule, ""))
    return out


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


def test_malformed_lines_are_quarantined_not_lost(small_run):
    work, _ = small_run
    q = work / "results/small/data/ingest/en_replay/messy.quarantine.jsonl"
    bad = [json.loads(line) for line in q.read_text().splitlines()]
    assert [b["line"] for b in bad] == [2, 3, 5, 6]
    assert [b["reason"] for b in bad] == ["ingest_bad_json", "ingest_missing_field", "ingest_bad_utf8", "ingest_empty_text"]
    assert all(b["file"].endswith("messy.jsonl.gz") for b in bad)
    kept = (work / "results/small/data/ingest/en_replay/messy.jsonl").read_text().splitlines()
    assert [json.loads(k)["id"] for k in kept] == ["en_replay/messy:1", "en_replay/messy:4", "en_replay/messy:7"]


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
                        ("ingest", "clean", "signature", "dedup", "decontaminate", "pii")}, jobs
    global_rules = sorted(r for r, w in jobs if "part=" not in w)
    # bands (2 groups), clusters, the changed category's shards, the funnel, and the target.
    assert global_rules == sorted(["bands", "bands", "clusters", "shards", "funnel"]), jobs
    assert ("shards", "category=zh_books") in jobs
    # A third run has nothing to do.
    proc = snakemake(work, "funnel")
    assert jobs_run(proc) == [] or "Nothing to be done" in proc.stderr
