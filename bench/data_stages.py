"""Benchmark of cptflow's data stages (clean, dedup), compared with datatrove's MinHash dedup.

Not part of CI or the tests: it reads the shared corpora beside the repository
(``REPO/../shared/data/corpus/{zh_modern,zh_classical,en_gutenberg}.jsonl``).

Usage::

    .venv/bin/python bench/data_stages.py [--shared PATH] [--max-docs N] [--planted N]
                                          [--datatrove-python PATH | --no-datatrove] [--no-write]

What it measures, each step in a fresh single-threaded subprocess so that peak memory (VmHWM)
is that step's own and "per core" means per CPU-second of that one process (the machine is shared,
so CPU seconds are steadier than wall seconds; both are printed):

1. ``cptflow.data.clean.run`` per corpus file: documents/s and MB/s (UTF-8 bytes of the input texts).
2. ``cptflow.data.minhash.minhash`` alone (texts already in memory), and the whole dedup path as
   the workflow runs it: ``signature.run`` per file → ``bands.run`` per band group → ``clusters.run``
   → ``apply.run`` per file, with the seconds of each stage.
3. The same dedup input through datatrove's four MinHash steps (``MinhashDedupSignature`` →
   ``MinhashDedupBuckets`` → ``MinhashDedupCluster`` → ``MinhashDedupFilter``, each run by a
   ``LocalPipelineExecutor`` with workers=1), one pipeline per language because datatrove fixes the
   word tokenizer per signature step. Datatrove runs in its own venv (never in .venv)::

       python3 -m venv bench/_work/venv-datatrove
       bench/_work/venv-datatrove/bin/pip install -c constraints.txt datatrove==0.10.1 spacy jieba \
           tokenizers orjson regex
       bench/_work/venv-datatrove/bin/pip install "xxhash<4"  # datatrove 0.10.1 hashes str; xxhash 4 wants bytes

   Without that venv the comparison is skipped and the output says why.

The dedup input is a PLANTED set built from the real corpora: every (sub-sampled) document, plus an
edited copy of ``--planted`` long documents (Chinese: characters substituted / inserted / deleted;
English: words replaced / inserted / deleted; 0-7 % of the units, as tests/test_dedup.py does at a
fixed rate). Recall is the share of planted pairs with reference Jaccard >= 0.7 that a tool puts in
one cluster; precision is the share of removed documents that have a cluster mate at reference
Jaccard >= 0.7. The reference is exact set Jaccard on 5-character (zh) / 5-word (en) shingles after
NFKC, lower-casing and punctuation removal, computed here independently of both tools.

The script prints a markdown report and rewrites only its own section of bench/RESULTS.md (between
``<!-- bench:data_stages:start -->`` and ``<!-- bench:data_stages:end -->``). Scratch files go to
bench/_work/data_stages/. A full run (all 22,446 documents) took 6.4 minutes on 2 cores at load
average 8, most of it in datatrove's `default` config (spaCy + jieba); `--max-docs 300` takes under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import run_info, write_section  # noqa: E402 (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "_work" / "data_stages"
DT_PYTHON = REPO / "bench" / "_work" / "venv-datatrove" / "bin" / "python"
CORPORA = {"zh_modern": "zh", "zh_classical": "zh", "en_gutenberg": "en"}
# cptflow runs: the defaults, and min_jaccard at the near-duplicate bar itself (NEAR_J), to show the
# recall/precision trade-off of verifying candidates by their estimated Jaccard.
CPTFLOW_CONFIGS = {"defaults": {}, "min_jaccard=0.70": {"min_jaccard": 0.70}}
NEAR_J = 0.7  # the near-duplicate bar both tools are configured for (cptflow min_jaccard; LSH S-curves)
J_BINS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01))
MAX_EDIT_RATE = 0.07  # edits per unit: at 7 % of characters, 5-char shingle Jaccard falls to ~0.5

# datatrove configurations compared. "matched": cptflow's shingles (5 characters for Chinese via a
# character tokenizer, 5 words for English) and cptflow's 20 bands x 6 rows = 120 permutations.
# "default": MinhashConfig() (14 x 8, 5-grams) with the tokenizers datatrove assigns to Mandarin
# (cmn_Hani: spaCy + jieba words) and English (eng: spaCy). "lang=zh": the same but language="zh",
# which datatrove 0.10.1 maps to its whitespace ("xx") tokenizer, see the report.
DT_CONFIGS = {
    "matched": {"n_grams": 5, "num_buckets": 20, "hashes_per_bucket": 6, "zh": "char", "en": "eng"},
    "default": {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8, "zh": "cmn_Hani", "en": "eng"},
    "lang=zh": {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8, "zh": "zh", "en": "eng"},
}


# --- measuring (runs inside each worker subprocess) -------------------------------------------------

def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB. Not ru_maxrss: Linux carries the forked
    parent's peak across exec into ru_maxrss, so a worker started by a big orchestrator would report
    the orchestrator's memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run fn; wall and CPU seconds (self + reaped children), RSS before, peak RSS (VmHWM) of the process."""
    s0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    base = _status_mb("VmRSS")
    w0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - w0
    s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, k) - getattr(a, k) for a, b in ((s0, s1), (c0, c1)) for k in ("ru_utime", "ru_stime"))
    return out, {"wall_s": wall, "cpu_s": cpu, "rss_before_mb": base, "peak_rss_mb": _status_mb("VmHWM")}


# --- workers ------------------------------------------------------------------------------------

def worker_clean(job: dict) -> dict:
    from cptflow.data.clean import CleanConfig, run

    cfg = CleanConfig()
    out = Path(job["out"])
    stats, m = measured(lambda: run(cfg, job["input"], out / "kept.jsonl", out / "dropped.jsonl"))
    return m | {"docs_in": stats["docs_in"], "docs_out": stats["docs_out"]}


def worker_minhash(job: dict) -> dict:
    from cptflow.data.minhash import DedupConfig, minhash

    texts, langs = [], []
    for path in job["inputs"]:
        for line in open(path, encoding="utf-8"):
            rec = json.loads(line)
            texts.append(rec["text"])
            langs.append(rec["lang"])
    sig, m = measured(lambda: minhash(texts, langs, DedupConfig()))
    return m | {"docs": len(sig)}


def worker_dedup(job: dict) -> dict:
    from cptflow.data import bands, clusters, signature
    from cptflow.data import dedup as apply
    from cptflow.data.minhash import DedupConfig

    cfg = DedupConfig(**job["params"])
    out = Path(job["out"])
    stems = [Path(p).stem for p in job["inputs"]]
    sigs = [str(out / f"{s}.sig.npz") for s in stems]
    pairs = [str(out / f"pairs.{g}.npz") for g in range(cfg.band_groups)]
    drops = [str(out / f"{s}.drop.jsonl") for s in stems]
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.process_time()
        fn()
        seconds[name] = seconds.get(name, 0.0) + time.process_time() - t0

    def chain() -> None:
        for p, s in zip(job["inputs"], sigs):
            timed("signature", lambda: signature.run(cfg, p, s, f"{s}.stats.json"))
        for g, p in enumerate(pairs):
            timed("bands", lambda: bands.run(cfg, sigs, g, p, f"{p}.stats.json"))
        timed("clusters", lambda: clusters.run(cfg, sigs, pairs, drops, out / "clusters.stats.json"))
        for p, s, d in zip(job["inputs"], stems, drops):
            timed("apply", lambda: apply.run(cfg, p, d, out / f"{s}.kept.jsonl", out / f"{s}.dropped.jsonl",
                                             out / f"{s}.kept.stats.json"))

    _, m = measured(chain)
    return m | {"stage_cpu_s": seconds, "drop_lists": drops, "band_groups": cfg.band_groups}


def worker_datatrove(job: dict) -> dict:
    """Runs in the datatrove venv: the four MinHash steps per language, each stage timed."""
    import importlib.metadata

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class CharTokenizer(WordTokenizer):
        """One token per non-space character: datatrove n-grams become character n-grams (as cptflow's)."""

        def word_tokenize(self, text: str) -> list[str]:
            return [c for c in text if not c.isspace()]

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    spec = job["config"]
    cfg = MinhashConfig(n_grams=spec["n_grams"], num_buckets=spec["num_buckets"],
                        hashes_per_bucket=spec["hashes_per_bucket"], seed=1,
                        hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    seconds: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)

    def stage(name: str, pipeline: list, tasks: int, logs: Path) -> None:
        _, m = measured(lambda: LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1,
                                                      logging_dir=str(logs), skip_completed=False).run())
        seconds[name] += m["cpu_s"]
        wall[name] += m["wall_s"]

    def chain() -> None:
        for lang, folder in job["inputs"].items():
            out = Path(job["out"]) / lang
            tok = CharTokenizer() if spec[lang] == "char" else spec[lang]

            def reader() -> JsonlReader:
                return JsonlReader(folder, glob_pattern="*.jsonl", add_file_path=False)

            stage("signature", [reader(), MinhashDedupSignature(str(out / "sigs"), config=cfg, language=tok)], 1,
                  out / "logs1")
            stage("buckets", [MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=cfg)],
                  cfg.num_buckets, out / "logs2")
            stage("cluster", [MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=cfg,
                                                  save_cluster_id=True)], 1, out / "logs3")
            stage("filter", [reader(),
                             MinhashDedupFilter(str(out / "remove"), load_cluster_ids=True,
                                                exclusion_writer=JsonlWriter(str(out / "removed"), compression=None)),
                             JsonlWriter(str(out / "kept"), compression=None)], 1, out / "logs4")

    _, m = measured(chain)
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    # Which word tokenizer datatrove picks for each way of naming Chinese (reported: "zh" and "zho" do
    # not reach jieba in 0.10.1).
    tokenizers = {}
    for code in ("zh", "zho", "cmn", "cmn_Hani", "zh_Hani"):
        try:
            t = load_word_tokenizer(code)
            tokenizers[code] = type(t).__name__ + (f"({t.language})" if hasattr(t, "language") else "")
        except Exception as e:  # noqa: BLE001 (report whatever it raises)
            tokenizers[code] = f"error: {type(e).__name__}"
    return m | {"stage_cpu_s": dict(seconds), "stage_wall_s": dict(wall), "zh_tokenizers": tokenizers,
                "version": importlib.metadata.version("datatrove"), "minhash_config": str(cfg)}


WORKERS = {"clean": worker_clean, "minhash": worker_minhash, "dedup": worker_dedup, "datatrove": worker_datatrove}


def spawn(python: str | Path, kind: str, job: dict, log: Path) -> dict:
    """Run one worker in a fresh, single-threaded process; its result JSON, or an error naming the log."""
    job_path = log.with_suffix(".job.json")
    job_path.write_text(json.dumps(job))
    env = os.environ | {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO / "src") if kind != "datatrove" else ""
    with open(log, "w") as f:
        r = subprocess.run([str(python), __file__, "--worker", kind, "--job", str(job_path)], stdout=f,
                           stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"worker {kind} failed (exit {r.returncode}); log {log}:\n" + "\n".join(tail))
    return json.loads(Path(job["result"]).read_text())


# --- the planted set ---------------------------------------------------------------------------

def read_corpus(path: Path, source: str, lang: str, max_docs: int | None, rng: random.Random) -> list[dict]:
    """Intermediate-format records of one corpus file; a seeded sample of max_docs if given."""
    recs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = json.loads(line)["text"]
            recs.append({"id": f"{source}/{source}:{lineno}", "text": text, "source": source, "category": source,
                         "lang": lang})
    if max_docs is not None and max_docs < len(recs):
        keep = sorted(rng.sample(range(len(recs)), max_docs))
        recs = [recs[i] for i in keep]
    return recs


def zh_edit(text: str, rate: float, rng: random.Random) -> str:
    """Substitute, insert or delete Han characters (about rate x their count, at least one)."""
    chars = list(text)
    han = [i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"]
    pool = [chars[i] for i in han]
    n = max(1, round(rate * len(han)))
    for k, i in enumerate(sorted(rng.sample(han, n), reverse=True)):
        op = k % 3
        if op == 0:
            chars[i] = rng.choice([c for c in rng.choices(pool, k=8) if c != chars[i]] or ["的"])
        elif op == 1:
            chars.insert(i, rng.choice(pool))
        else:
            del chars[i]
    return "".join(chars)


def en_edit(text: str, rate: float, rng: random.Random) -> str:
    """Replace, insert or delete space-separated words with words of the same document."""
    words = text.split(" ")
    vocab = sorted({w for w in words if w.isalpha()}) or ["indeed"]
    n = max(1, round(rate * len(words)))
    for k, i in enumerate(sorted(rng.sample(range(len(words)), n), reverse=True)):
        op = k % 3
        if op == 0:
            words[i] = rng.choice(vocab)
        elif op == 1:
            words.insert(i, rng.choice(vocab))
        else:
            del words[i]
    return " ".join(words)


def plant(corpora: dict[str, list[dict]], n_pairs: int, rng: random.Random) -> tuple[dict[str, list[dict]], list[tuple[str, str]]]:
    """Edited copies of n_pairs long documents (spread over the corpora): {lang: copies}, [(original, copy)]."""
    copies: dict[str, list[dict]] = {"zh": [], "en": []}
    pairs = []
    per = n_pairs // len(corpora)
    for name, recs in corpora.items():
        lang = CORPORA[name]
        if lang == "zh":
            long_ = [r for r in recs if sum("\u4e00" <= c <= "\u9fff" for c in r["text"]) >= 200]
        else:
            long_ = [r for r in recs if len(r["text"].split(" ")) >= 150]
        for r in rng.sample(long_, min(per, len(long_))):
            rate = rng.uniform(0.0, MAX_EDIT_RATE)
            text = zh_edit(r["text"], rate, rng) if lang == "zh" else en_edit(r["text"], rate, rng)
            part = f"{lang}_copies"
            cid = f"planted/{part}:{len(copies[lang]) + 1}"
            copies[lang].append({"id": cid, "text": text, "source": "planted", "category": "planted", "lang": lang})
            pairs.append((r["id"], cid))
    return copies, pairs


@lru_cache(maxsize=1)
def _punct_to_space() -> dict[int, str]:
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def ref_shingles(text: str, lang: str, n: int = 5) -> frozenset[str]:
    """Reference shingles: NFKC, lower case, punctuation removed; 5 characters (zh) or 5 words (en)."""
    t = unicodedata.normalize("NFKC", text).lower().translate(_punct_to_space())
    if lang == "zh":
        s = "".join(t.split())
        return frozenset(s[i:i + n] for i in range(len(s) - n + 1)) or frozenset([s])
    w = t.split()
    return frozenset(" ".join(w[i:i + n]) for i in range(len(w) - n + 1)) or frozenset([" ".join(w)])


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# --- scoring -----------------------------------------------------------------------------------

def score(removed: set[str], cluster_of: dict[str, str], pairs: list[tuple[str, str]], pair_j: list[float],
          docs: dict[str, dict], shingles: Callable[[str], frozenset]) -> dict[str, Any]:
    """Recall on planted pairs (by reference-Jaccard bin) and precision of the removals."""
    hit = [cluster_of.get(o) is not None and cluster_of.get(o) == cluster_of.get(c) for o, c in pairs]
    near = [h for h, j in zip(hit, pair_j) if j >= NEAR_J]
    by_bin = {}
    for lo, hi in J_BINS:
        sel = [h for h, j in zip(hit, pair_j) if lo <= j < hi]
        by_bin[f"{lo:.1f}-{min(hi, 1.0):.1f}"] = (sum(sel), len(sel))
    members: dict[str, list[str]] = defaultdict(list)
    for d, c in cluster_of.items():
        members[c].append(d)
    best, best_mate = [], []
    removed = sorted(removed)
    for d in removed:
        mates = sorted(m for m in members[cluster_of[d]] if m != d)[:25]
        js = [(jaccard(shingles(d), shingles(m)), m) for m in mates]
        j, m = max(js, default=(0.0, None))
        best.append(j)
        best_mate.append(m)
    planted_ids = {x for p in pairs for x in p}
    return {
        "recall": sum(near) / len(near) if near else float("nan"), "near_pairs": len(near),
        "recall_all": sum(hit) / len(hit) if hit else float("nan"), "by_bin": by_bin,
        "removed": len(removed), "removed_planted": len(set(removed) & planted_ids),
        "precision": sum(b >= NEAR_J for b in best) / len(best) if best else float("nan"),
        "low_j": sum(b < 0.5 for b in best),
        "low_j_by_source": dict(sorted(Counter(d.split("/")[0] for d, b in zip(removed, best) if b < 0.5).items())),
        # a few removed documents whose closest cluster mate is below J 0.5, shown in the report
        "low_j_examples": [{"removed": d, "mate": m, "j": round(b, 3), "removed_text": docs[d]["text"][:60],
                            "mate_text": docs[m]["text"][:60] if m else ""}
                           for d, m, b in zip(removed, best_mate, best) if b < 0.5][:4],
    }


def cptflow_clusters(drop_lists: list[str]) -> tuple[set[str], dict[str, str]]:
    removed, cluster_of = set(), {}
    for p in drop_lists:
        for line in open(p, encoding="utf-8"):
            r = json.loads(line)
            removed.add(r["id"])
            cluster_of[r["id"]] = cluster_of[r["kept"]] = r["kept"]
    return removed, cluster_of


def datatrove_clusters(out: Path) -> tuple[set[str], dict[str, str], int]:
    removed, cluster_of, n = set(), {}, 0
    for lang_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        for kind in ("kept", "removed"):
            for f in sorted((lang_dir / kind).glob("*.jsonl")) if (lang_dir / kind).exists() else []:
                for line in open(f, encoding="utf-8"):
                    r = json.loads(line)
                    n += 1
                    if kind == "removed":
                        removed.add(r["id"])
                    cid = r.get("metadata", {}).get("minhash_cluster_id", -1)
                    if cid >= 0:
                        cluster_of[r["id"]] = f"{lang_dir.name}:{cid}"
    return removed, cluster_of, n


# --- report ------------------------------------------------------------------------------------

def machine_info() -> dict[str, str]:
    import importlib.metadata as md

    vers = {}
    for pkg in ("torch", "numpy", "xxhash"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = "absent"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **vers}


def rate(n: float, s: float) -> str:
    return f"{n / s:,.0f}" if s > 0 else "-"


def mbps(b: float, s: float) -> str:
    return f"{b / 1e6 / s:.2f}" if s > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared folder (has data/corpus)")
    ap.add_argument("--max-docs", type=int, default=None, help="sample at most N documents per corpus file (seeded)")
    ap.add_argument("--planted", type=int, default=900, help="edited copies planted (split over the three corpora)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--datatrove-python", type=Path, default=DT_PYTHON, help="python of the datatrove venv")
    ap.add_argument("--no-datatrove", action="store_true", help="skip the datatrove comparison")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.job.read_text())
        Path(job["result"]).write_text(json.dumps(WORKERS[args.worker](job)))
        return 0

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    info = machine_info()
    corpus_dir = args.shared / "data" / "corpus"
    rng = random.Random(args.seed)
    if WORK.exists():
        shutil.rmtree(WORK)
    (WORK / "logs").mkdir(parents=True)
    corpora = {name: read_corpus(corpus_dir / f"{name}.jsonl", name, lang, args.max_docs, rng)
               for name, lang in CORPORA.items()}
    copies, pairs = plant(corpora, args.planted, rng)

    def write(path: Path, recs: list[dict]) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return str(path)

    clean_inputs = {name: write(WORK / "input" / f"{name}.jsonl", recs) for name, recs in corpora.items()}
    dedup_dirs = {lang: WORK / "dedup_in" / lang for lang in ("zh", "en")}
    dedup_inputs = [write(dedup_dirs[CORPORA[n]] / f"{n}.jsonl", recs) for n, recs in corpora.items()]
    dedup_inputs += [write(dedup_dirs[lang] / f"{lang}_copies.jsonl", recs) for lang, recs in copies.items()]
    docs = {r["id"]: r for recs in [*corpora.values(), *copies.values()] for r in recs}
    n_docs = len(docs)
    n_bytes = sum(len(r["text"].encode("utf-8")) for r in docs.values())

    @lru_cache(maxsize=None)
    def shingles(doc_id: str) -> frozenset:
        return ref_shingles(docs[doc_id]["text"], docs[doc_id]["lang"])

    pair_j = [jaccard(shingles(o), shingles(c)) for o, c in pairs]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # 1. clean, one process per corpus file
    clean_rows = []
    for name, path in clean_inputs.items():
        out = WORK / "clean" / name
        out.mkdir(parents=True)
        res = spawn(sys.executable, "clean", {"input": path, "out": str(out), "result": str(out / "result.json")},
                    WORK / "logs" / f"clean_{name}.log")
        b = sum(len(r["text"].encode("utf-8")) for r in corpora[name])
        clean_rows.append((name, res, b))
        log(f"clean {name}: {res['docs_in']} docs, {res['cpu_s']:.1f} s CPU")

    # 2. cptflow dedup: minhash alone, then the whole path
    out = WORK / "cptflow_minhash"
    out.mkdir()
    mh = spawn(sys.executable, "minhash", {"inputs": dedup_inputs, "result": str(out / "result.json")},
               WORK / "logs" / "minhash.log")
    log(f"minhash: {mh['cpu_s']:.1f} s CPU")
    cp_results: dict[str, tuple[dict, dict]] = {}
    for name, params in CPTFLOW_CONFIGS.items():
        out = WORK / f"cptflow_dedup_{name.replace('=', '_')}"
        out.mkdir()
        res = spawn(sys.executable, "dedup", {"inputs": dedup_inputs, "out": str(out), "params": params,
                                              "result": str(out / "result.json")}, WORK / "logs" / f"dedup_{name}.log")
        cp_results[name] = (res, score(*cptflow_clusters(res["drop_lists"]), pairs, pair_j, docs, shingles))
        log(f"cptflow dedup {name}: {res['cpu_s']:.1f} s CPU, recall {cp_results[name][1]['recall']:.3f}")

    # 3. datatrove
    dt_results: dict[str, tuple[dict, dict]] = {}
    dt_skip = None
    if args.no_datatrove:
        dt_skip = "--no-datatrove given"
    elif not args.datatrove_python.exists():
        dt_skip = f"no datatrove venv at {args.datatrove_python} (see the docstring to create it)"
    else:
        probe = subprocess.run([str(args.datatrove_python), "-c", "import datatrove.pipeline.dedup.minhash, spacy, jieba"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            dt_skip = f"datatrove not importable from {args.datatrove_python}: {probe.stderr.strip().splitlines()[-1]}"
    if dt_skip is None:
        for name, spec in DT_CONFIGS.items():
            out = WORK / f"datatrove_{name.replace('=', '_')}"
            out.mkdir()
            res = spawn(args.datatrove_python, "datatrove",
                        {"config": spec, "inputs": {k: str(v) for k, v in dedup_dirs.items()}, "out": str(out),
                         "result": str(out / "result.json")}, WORK / "logs" / f"datatrove_{name}.log")
            d_removed, d_clusters, d_seen = datatrove_clusters(out)
            if d_seen != n_docs:
                raise RuntimeError(f"datatrove {name}: {d_seen} documents came out, {n_docs} went in")
            dt_results[name] = (res, score(d_removed, d_clusters, pairs, pair_j, docs, shingles))
            log(f"datatrove {name}: {res['cpu_s']:.1f} s CPU, recall {dt_results[name][1]['recall']:.3f}")

    body = report(args, info, load0, os.getloadavg(), corpora, copies, pairs, pair_j, n_docs, n_bytes, clean_rows,
                  mh, cp_results, dt_results, dt_skip, time.perf_counter() - t_start)
    print(body)
    if not args.no_write:
        write_section("data_stages", body)
    return 0


def report(args, info, load0, load1, corpora, copies, pairs, pair_j, n_docs, n_bytes, clean_rows, mh, cp_results,
           dt_results, dt_skip, total_s) -> str:
    from cptflow.data.minhash import DedupConfig

    cfg = DedupConfig()
    dd, cp_score = cp_results["defaults"]
    sample = "all documents" if args.max_docs is None else f"a seeded sample of at most {args.max_docs} documents per file"
    L = ["## Data stages: clean and dedup (`bench/data_stages.py`)", ""]
    L += [run_info("data_stages.py", load0), "",
          f"numpy {info['numpy']}, xxhash {info['xxhash']}. Input: {sample} of the shared corpora "
          f"({', '.join(f'{n} {len(r)}' for n, r in corpora.items())}). Each step ran in its own single-threaded "
          f"process; \"per core\" = per CPU-second of that process (user + system), which a shared machine "
          f"disturbs less than wall time; peak RSS is that process's VmHWM (Python + imports included). "
          f"Whole run {total_s / 60:.1f} min.", ""]
    L += ["| step | docs | MB | CPU s | wall s | docs/s per core | MB/s per core | peak RSS MB |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    tot = [0, 0, 0.0, 0.0]
    for name, res, b in clean_rows:
        kept = f" ({res['docs_out'] / res['docs_in']:.0%} kept)"
        L.append(f"| clean `{name}`{kept} | {res['docs_in']:,} | {b / 1e6:.1f} | {res['cpu_s']:.2f} | {res['wall_s']:.2f} | "
                 f"{rate(res['docs_in'], res['cpu_s'])} | {mbps(b, res['cpu_s'])} | {res['peak_rss_mb']:.0f} |")
        tot = [tot[0] + res["docs_in"], tot[1] + b, tot[2] + res["cpu_s"], tot[3] + res["wall_s"]]
    L.append(f"| clean, all {len(clean_rows)} files | {tot[0]:,} | {tot[1] / 1e6:.1f} | {tot[2]:.2f} | {tot[3]:.2f} | "
             f"{rate(tot[0], tot[2])} | {mbps(tot[1], tot[2])} | - |")
    dedup_label = f"{n_docs:,} | {n_bytes / 1e6:.1f}"
    L.append(f"| dedup: `minhash()` signatures only (texts in memory) | {dedup_label} | {mh['cpu_s']:.2f} | "
             f"{mh['wall_s']:.2f} | {rate(n_docs, mh['cpu_s'])} | {mbps(n_bytes, mh['cpu_s'])} | {mh['peak_rss_mb']:.0f} |")
    st = dd["stage_cpu_s"]
    L.append(f"| dedup: whole path (files in, files out), defaults¹ | {dedup_label} | {dd['cpu_s']:.2f} | {dd['wall_s']:.2f} | "
             f"{rate(n_docs, dd['cpu_s'])} | {mbps(n_bytes, dd['cpu_s'])} | {dd['peak_rss_mb']:.0f} |")
    for name, (res, _) in dt_results.items():
        L.append(f"| datatrove {res['version']} MinHash, `{name}` config² | {dedup_label} | {res['cpu_s']:.2f} | "
                 f"{res['wall_s']:.2f} | {rate(n_docs, res['cpu_s'])} | {mbps(n_bytes, res['cpu_s'])} | "
                 f"{res['peak_rss_mb']:.0f} |")
    n_files = len(dd["drop_lists"])
    L += ["", f"¹ CPU seconds by stage: signature {st['signature']:.2f} ({n_files} files), bands {st['bands']:.2f} "
          f"({dd['band_groups']} band groups, each reads all signatures), clusters {st['clusters']:.2f}, "
          f"apply {st['apply']:.2f}."]
    if dt_results:
        L.append("² " + "; ".join(
            f"`{n}`: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_cpu_s"].items())
            for n, (r, _) in dt_results.items()) + " CPU s (signature includes reading the JSONL; one pipeline per "
            "language, LocalPipelineExecutor workers=1, buckets stage = one task per bucket).")
    L += ["", "### Near-duplicate detection on the planted set", ""]
    n_copies = {k: len(v) for k, v in copies.items()}
    L += [f"{len(pairs)} planted pairs (an original from the corpora + an edited copy: {n_copies['zh']} Chinese, "
          f"{n_copies['en']} English; 0-{MAX_EDIT_RATE:.0%} of characters/words substituted, inserted or deleted) "
          f"among {n_docs:,} documents (the whole dedup input above). Recall = planted pairs with reference Jaccard "
          f">= {NEAR_J} that the tool put in one cluster; precision = removed documents that have a cluster mate at "
          f"reference Jaccard >= {NEAR_J}; \"J<0.5\" = removed documents whose closest cluster mate is below 0.5 "
          f"(by source). The reference is exact Jaccard on 5-character (zh) / 5-word (en) shingles after NFKC, "
          f"lower-casing and punctuation removal, i.e. the near-duplicate definition cptflow and datatrove "
          f"`matched` are configured for. Speed ratio = the row's CPU seconds ÷ cptflow defaults', whole dedup "
          f"path, same input (above 1: cptflow is faster; wall-time ratio in brackets).", ""]
    bins = [f"{k} (n={v[1]})" for k, v in cp_score["by_bin"].items()]
    L += ["| tool, config | recall J>=0.7 (n=%d) | " % cp_score["near_pairs"] + " | ".join(f"recall J {b}" for b in bins)
          + " | precision | J<0.5 | removed (of them planted) | docs/s per core | speed ratio |",
          "|---|---:|" + "---:|" * len(bins) + "---:|---:|---:|---:|---:|"]

    def row(label: str, s: dict, res: dict) -> str:
        cells = " | ".join(f"{h / n:.2f}" if n else "-" for h, n in s["by_bin"].values())
        low = ", ".join(f"{k} {v}" for k, v in s["low_j_by_source"].items())
        return (f"| {label} | **{s['recall']:.3f}** | {cells} | {s['precision']:.3f} | {s['low_j']}"
                f"{f' ({low})' if low else ''} | {s['removed']:,} ({s['removed_planted']}) | "
                f"{rate(n_docs, res['cpu_s'])} | {res['cpu_s'] / dd['cpu_s']:.2f} ({res['wall_s'] / dd['wall_s']:.2f}) |")

    for name, (res, s) in cp_results.items():
        label = f"defaults (min_jaccard={cfg.min_jaccard})" if name == "defaults" else name
        L.append(row(f"cptflow `{label}`", s, res))
    for name, (res, s) in dt_results.items():
        L.append(row(f"datatrove `{name}`", s, res))
    std = (NEAR_J * (1 - NEAR_J) / cfg.num_perm) ** 0.5
    L += ["", f"cptflow verifies every LSH candidate by its estimated Jaccard (standard deviation "
          f"sqrt(J(1-J)/{cfg.num_perm}) = {std:.3f} at J = {NEAR_J}) and keeps pairs at >= min_jaccard "
          f"({cfg.min_jaccard} by default); datatrove has no verification step, so every LSH bucket collision "
          "counts as a duplicate."]
    for name, (res, s) in list(cp_results.items())[1:]:
        L.append(f"With `{name}` instead of the default {cfg.min_jaccard}: recall {cp_score['recall']:.3f} -> "
                 f"{s['recall']:.3f}, precision {cp_score['precision']:.3f} -> {s['precision']:.3f}, removals below "
                 f"J 0.5 {cp_score['low_j']} -> {s['low_j']}.")
    if dt_skip:
        L += ["", f"Datatrove comparison skipped: {dt_skip}."]
    examples = [(f"cptflow `{n}`", s) for n, (_, s) in cp_results.items()] + \
        [(f"datatrove `{n}`", s) for n, (_, s) in dt_results.items()]
    if any(s["low_j_examples"] for _, s in examples):
        L += ["", "Removed documents whose closest cluster mate is below J 0.5 (up to 4 per tool; the first 60 "
              "characters of each side):", ""]
        for label, s in examples:
            for e in s["low_j_examples"]:
                clip = lambda t: t.replace("\n", " ").replace("|", "/")  # noqa: E731
                L.append(f"- {label}, J {e['j']}: `{e['removed']}` «{clip(e['removed_text'])}» ~ `{e['mate']}` "
                         f"«{clip(e['mate_text'])}»")
    L += ["", "Configurations (both tools: seed 1; each removes all but one document per cluster):", "",
          f"- cptflow `DedupConfig()` defaults (the four stage modules cptflow.data.signature / bands / clusters / "
          f"dedup, through their `run()`): exact hash {'on' if cfg.exact else 'off'}; {cfg.shingle_chars}-character "
          f"shingles for zh, {cfg.shingle_words}-word for en after NFKC, lower case, punctuation removed; "
          f"{cfg.num_perm} permutations (a*x+b) mod 2^31-1, LSH {cfg.bands} bands x {cfg.rows} rows; candidate pairs "
          f"verified by estimated Jaccard >= {cfg.min_jaccard}; {cfg.band_groups} band groups; buckets above "
          f"{cfg.max_bucket_all_pairs} members compared star+chain."]
    if dt_results:
        v = next(iter(dt_results.values()))[0]["version"]
        L += [f"- datatrove {v}, xxhash 64-bit shingle hashes, (a*x+b) mod 2^61-1, `simplify_text` defaults (lower "
              "case, punctuation removed, digits -> 0, diacritics folded); Chinese and English run as two pipelines "
              "(the word tokenizer is fixed per signature step).",
              "  - `matched`: `MinhashConfig(n_grams=5, num_buckets=20, hashes_per_bucket=6)`; zh: a one-token-per-"
              "character `WordTokenizer` (so 5-character shingles, as cptflow), en: `language=\"eng\"` (spaCy "
              "English, 5-word shingles).",
              "  - `default`: `MinhashConfig()` = 5-grams, 14 buckets x 8 hashes; zh: `language=\"cmn_Hani\"` "
              "(spaCy + jieba words, so 5-word shingles), en: `\"eng\"`.",
              "  - `lang=zh`: as `default` but zh with `language=\"zh\"`.",
              f"- The word tokenizer datatrove {v} returns for each code of Chinese (`load_word_tokenizer`): "
              + ", ".join(f"`{k}` → {t}" for k, t in next(iter(dt_results.values()))[0]["zh_tokenizers"].items())
              + "."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
