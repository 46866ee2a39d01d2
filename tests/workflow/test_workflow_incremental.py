"""Adding data to a run with a pinned tokenizer (issue 10): only the new file is processed and packed.

The real snakemake on tests/configs/tiny.yaml's corpus (copied, so a file can be added), with
``vocab.tokenizer`` pinned to an expanded tokenizer made beforehand by the vocab stage itself. After
one run up to the last training stage, one more input file must cost that file's data jobs, its
pack shard, the global dedup jobs (bands, clusters), the layout step and the training stages:
never the vocabulary, the model's initialisation or another file's jobs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEMO, REPO
from support.workflow import jobs_run, run_checked

pytestmark = pytest.mark.slow
TARGET = "results/tiny/train/full/model"


def snakemake(work: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", "2", *extra]
    return run_checked(cmd, work / "results")


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("pinned")
    cfg = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text(encoding="utf-8"))
    for src in cfg["sources"]:  # the same files, from a corpus folder of the test's own
        (work / "corpus" / src["name"]).mkdir(parents=True)
        for p in src["paths"]:
            shutil.copy(REPO / p, work / "corpus" / src["name"])
        src["paths"] = [f"corpus/{src['name']}/*.jsonl"]
    tok = work / "pinned_tokenizer"  # an expanded tokenizer, made once by the vocab stage itself
    subprocess.run([sys.executable, "-m", "cptflow.tokenizer.vocab", "--base-tokenizer", str(DEMO / "tokenizer"),
                    "--train-text", str(DEMO / "corpus/zh_web/wangdoc_bash.jsonl"), "--output-dir", str(tok),
                    "--heldout-en", str(DEMO / "heldout/en.jsonl"), "--params", json.dumps({"vocab_size": 3000})],
                   check=True, capture_output=True, cwd=REPO)
    cfg["vocab"]["tokenizer"] = str(tok)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    first = snakemake(work, TARGET)
    return work, first


def test_a_pinned_tokenizer_is_copied_not_trained(pinned_run):
    work, first = pinned_run
    run = work / "results/tiny"
    manifest = json.loads((run / "tokenizer.stats.json").read_text())
    assert manifest["vocab"]["method"] == "pinned" and manifest["vocab"]["added"] > 0
    assert not any(k.endswith(".parquet") for k in manifest["inputs"])  # no training text was read
    assert (run / "tokenizer/tokenizer.json").read_bytes() == (work / "pinned_tokenizer/tokenizer.json").read_bytes()
    jobs = {r for r, _ in jobs_run(first)}
    assert {"vocab", "init_model", "pack_encoder", "pack_shard", "pack", "train"} <= jobs


def test_adding_one_file_packs_only_it_and_retrains_nothing_else(pinned_run):
    work, _ = pinned_run
    run = work / "results/tiny"
    before = {p: p.stat().st_mtime_ns for p in [*(run / "pack/shards").rglob("*"), *(run / "model/init").rglob("*"),
                                                 *(run / "tokenizer").rglob("*")] if p.is_file()}
    docs_before = json.loads((run / "pack/counts.json").read_text())["categories"]["zh_books"]["docs"]
    lines = (DEMO / "corpus/zh_books/tang300.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    (work / "corpus/zh_books/tang.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    new = "source=zh_books, part=tang"
    # The dry run lists what Snakemake can plan before the dedup checkpoint has rerun: the new file's
    # jobs up to its signature, the global dedup jobs, the layout and the training stages. The jobs
    # after the checkpoint are decided once clusters has run (the real run below).
    plan = jobs_run(snakemake(work, TARGET, "--dry-run"))
    assert sorted(plan) == sorted([("ingest", new), ("clean", new), ("signature", new), ("bands", "group=0, hrange=0"),
                                   ("bands", "group=1, hrange=0"), ("clusters", ""), ("pack", ""),
                                   ("train", "stage=embed_align"), ("train", "stage=full")]), plan
    jobs = jobs_run(snakemake(work, TARGET))
    per_file = {(r, w) for r, w in jobs if "part=" in w}
    assert per_file == {(r, new) for r in ("ingest", "clean", "signature", "dedup", "decontaminate", "pii", "shards",
                                           "pack_shard")}, jobs
    assert sorted(r for r, w in jobs if "part=" not in w) == ["bands", "bands", "clusters", "pack", "train", "train"]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # other files' pack shards, the tokenizer and the initialised model untouched
    counts = json.loads((run / "pack/counts.json").read_text())
    assert counts["categories"]["zh_books"]["shards"] == 2 and counts["categories"]["zh_books"]["docs"] > docs_before
