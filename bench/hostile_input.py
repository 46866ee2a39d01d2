"""Benchmark: what checking inputs costs, and the data stages on pathological text (issue 14).

Usage::

    .venv/bin/python bench/hostile_input.py            # writes the `hostile_input` section of bench/RESULTS.md
    .venv/bin/python bench/hostile_input.py --no-write

Three measurements, in one process (the machine is shared: each number is the median of ``--repeats``):

* the input check of ``cptflow.core.provenance.verify_inputs`` (size + sha256 against the producer's
  manifest) on an ingest output of the shared Chinese corpus (``--corpus``, copied ``--copies`` times to
  make the file bigger), against the clean stage's own time on the same file;
* the trailing-whitespace pattern of ``cptflow.data.normalise`` before issue 14 (``[ \\t]+$``,
  MULTILINE) against today's on one line holding a run of N spaces;
* each data stage's per-document function on 1 MiB pathological inputs
  (``tests/support/linear_time.py``), as the largest ratio to 1 MiB of real text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from results_md import run_info, write_section  # noqa: E402

OLD_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)  # the pattern of commit 73b26b2, for comparison


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def input_check(corpus: Path, copies: int, repeats: int) -> dict:
    from cptflow.core.provenance import verify_inputs
    from cptflow.core.stats import write_manifest
    from cptflow.data import clean, ingest

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        raw = d / "raw.jsonl"
        with open(raw, "wb") as f:
            for _ in range(copies):
                f.write(corpus.read_bytes())
        docs = d / "ingest.jsonl"
        stats, _ = ingest.run(ingest.IngestConfig(), raw, docs, d / "ingest.quarantine.jsonl", source="s",
                              category="c", lang="zh")
        write_manifest(d / "ingest.stats.json", stage="ingest", version=1, params={}, inputs=[raw], stats=stats,
                       seconds=0, outputs=[docs])
        check = _median(lambda: verify_inputs([docs]), repeats)
        cfg = clean.CleanConfig()
        stage = _median(lambda: clean.run(cfg, docs, d / "c.jsonl", d / "c.dropped.jsonl"), max(1, repeats // 2))
        return {"mb": docs.stat().st_size / 1e6, "docs": int(stats["docs_out"]), "check_s": check, "clean_s": stage}


def trailing(repeats: int) -> list[dict]:
    from cptflow.data.normalise import _TRAILING_SPACE_RE

    rows = []
    for n in (10_000, 20_000, 40_000):
        text = "a" + " " * n + "b"
        rows.append({"spaces": n, "old_s": _median(lambda: OLD_TRAILING.sub("", text), 1),
                     "new_s": _median(lambda: _TRAILING_SPACE_RE.sub("", text), repeats)})
    text = "a" + " " * (1 << 20) + "b"
    rows.append({"spaces": 1 << 20, "old_s": None, "new_s": _median(lambda: _TRAILING_SPACE_RE.sub("", text), repeats)})
    return rows


def stages(repeats: int) -> list[dict]:
    from support.linear_time import SIZE, normal, pathological

    from cptflow.data.clean import CleanConfig, clean_document
    from cptflow.data.contamination import SEED, DecontaminateConfig, build_index, find_match, prepare_lookup
    from cptflow.data.ingest import parse_line
    from cptflow.data.minhash import DedupConfig, exact_hash, minhash, multipliers
    from cptflow.data.pii import PiiConfig, mask_pii
    from cptflow.eval.benchmarks import BenchmarkSpec, read_questions

    demo = ROOT / "workflow/resources/demo/benchmarks"
    qs = [(q, lang) for name, lang in (("cmmlu", "zh"), ("mmlu", "en"))
          for q in read_questions(BenchmarkSpec(name=name, path=str(demo / name), layout=name, lang=lang), "test")]
    dcfg = DecontaminateConfig()
    lookup, mult = prepare_lookup(build_index(qs, dcfg)[0]), multipliers(SEED, max(dcfg.ngram_chars, dcfg.ngram_words))
    ccfg, pcfg, mcfg = CleanConfig(max_chars=None), PiiConfig(), DedupConfig()
    fns = {
        "ingest (parse_line)": lambda t: parse_line(json.dumps({"text": t}, ensure_ascii=False).encode(), "text"),
        "clean, en (max_chars off)": lambda t: clean_document(t, "en", ccfg),
        "clean, zh (max_chars off)": lambda t: clean_document(t, "zh", ccfg),
        "signature (MinHash zh + exact hash)": lambda t: (minhash([t], ["zh"], mcfg), exact_hash(t, "en")),
        "decontaminate (find_match)": lambda t: find_match(t, lookup, mult),
        "pii (mask_pii)": lambda t: mask_pii(t, pcfg),
    }
    normals = [normal("en"), normal("zh")]
    cases = pathological()
    rows = []
    for name, fn in fns.items():
        fn(normals[0][:1000])
        t_norm = max(_median(lambda x=x: fn(x), repeats) for x in normals)
        worst, worst_s = max(((case, _median(lambda t=t: fn(t), repeats)) for case, t in cases.items()),
                             key=lambda kv: kv[1])
        rows.append({"stage": name, "normal_s": t_norm, "worst": worst, "worst_s": worst_s, "size": SIZE,
                     "cases": len(cases)})
    return rows


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True).stdout
    return head + (" (with uncommitted changes under src/)" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=ROOT.parent.parent / "shared/data/corpus/zh_modern.jsonl")
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if not args.corpus.is_file():
        args.corpus = Path("/work/shared/data/corpus/zh_modern.jsonl")
    load = os.getloadavg()
    chk = input_check(args.corpus, args.copies, args.repeats)
    trail = trailing(args.repeats)
    st = stages(args.repeats)
    lines = [
        "## hostile input: checked inputs and pathological text (`bench/hostile_input.py`)", "",
        f"Commit {_commit()}. {run_info('hostile_input.py', load)}", "",
        f"**Input check.** An ingest output of {chk['mb']:.1f} MB ({chk['docs']} documents: {args.corpus.name} "
        f"x {args.copies}): `verify_inputs` (size, then sha256 against the manifest) {chk['check_s']:.3f} s = "
        f"{chk['mb'] / chk['check_s']:.0f} MB/s; the clean stage on the same file {chk['clean_s']:.2f} s = "
        f"{chk['mb'] / chk['clean_s']:.1f} MB/s. The check costs {100 * chk['check_s'] / chk['clean_s']:.1f} % "
        "of the stage it protects.", "",
        "**Trailing whitespace, one line with a run of spaces** (seconds; old = `[ \\t]+$` of 73b26b2, new = "
        "`(?<![ \\t])[ \\t]++$`):", "",
        "| spaces | old | new |", "|---:|---:|---:|",
        *(f"| {r['spaces']:,} | {_s(r['old_s'])} | {r['new_s']:.4f} |" for r in trail), "",
        f"**Per-document functions on {st[0]['size']:,}-character pathological inputs** (the slowest of "
        f"{st[0]['cases']} inputs against the "
        "slower of 1 MiB of real English or Chinese text):", "",
        "| stage | real text (s) | slowest pathological input | its time (s) | ratio |", "|---|---:|---|---:|---:|",
        *(f"| {r['stage']} | {r['normal_s']:.3f} | {r['worst']} | {r['worst_s']:.3f} | {r['worst_s'] / r['normal_s']:.1f} |"
          for r in st),
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("hostile_input", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
