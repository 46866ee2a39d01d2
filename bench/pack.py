"""Benchmark: tokenize + pack throughput of ``cptflow.pack.pack`` against a plain ``datasets.map`` pipeline.

Usage::

    .venv/bin/python bench/pack.py                 # 5 repeats, writes the `pack` section of bench/RESULTS.md
    .venv/bin/python bench/pack.py --repeats 1 --no-write

Both sides get the same text (the real Chinese + English JSONL of ``--corpus``, converted once to one
parquet shard per file, outside the timing), the same fast tokenizer (the demo tokenizer expanded
with ``python -m cptflow.tokenizer.vocab`` to ~72k pieces, built into bench/_work/pack/ on first run) and
the same 2 cores:

* cptflow: ``cptflow.pack.encoder.run`` once (the tokenizer reduced to its Rust backend and special ids),
  then ``cptflow.pack.pack_shard.run`` on every shard in turn (as the workflow's per-file jobs do, one
  after the other here), each reading its shard in batches, tokenizing with ``encode_batch_fast``
  (``num_threads`` Rust threads) and streaming BOS + ids + EOS into ``max_length`` rows on disk (2- or
  4-byte ids, document starts); then ``cptflow.pack.pack.run``, the layout step that buckets and
  shuffles the rows into an index without copying them;
* the same cptflow work as the workflow runs it: one process per job (``python -m cptflow.pack.encoder``,
  ``cptflow.pack.pack_shard`` per shard, ``cptflow.pack.pack``), one after the other, so each job's
  interpreter start and imports are on its clock (the baseline's imports are not);
* the baseline is what Hugging Face's ``run_clm.py`` example does: ``load_dataset("parquet")``,
  ``map(tokenize, batched=True, num_proc=2)`` with ``tokenizer(examples["text"])``, then
  ``map(group_texts, batched=True, num_proc=2)`` (concatenate each batch of 1000 documents, cut into
  ``block_size`` chunks, drop the batch's remainder, ``labels`` = ``input_ids``), then
  ``save_to_disk``. Its cache lives in a fresh folder per run, so nothing is reused.

Each measurement runs in a fresh subprocess (so the Rust thread pool and ``datasets`` caches start
cold); the clock covers tokenizer loading to the dataset on disk, not Python imports. The two
pipelines alternate, and the median of ``--repeats`` runs is reported (the machine is shared).
Throughput is document tokens per second: tokens of the text itself, not the BOS/EOS/padding the
pipelines add, counted by each pipeline on its own output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from results_md import run_info, write_section  # noqa: E402 (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work" / "pack"
SECTION = "pack"
DEMO = ROOT / "workflow" / "resources" / "demo"


def build_tokenizer(out: Path, report_md: Path) -> float:
    """The demo's expanded tokenizer (vocab_size 44000 on zh_web), as the brief of this benchmark asks."""
    demo = DEMO
    cmd = [sys.executable, "-m", "cptflow.tokenizer.vocab", "--base-tokenizer", str(demo / "tokenizer"),
           "--train-text", *sorted(str(p) for p in (demo / "corpus" / "zh_web").glob("*.jsonl")),
           "--heldout-zh", str(demo / "heldout" / "zh_modern.jsonl"),
           "--heldout-en", str(demo / "heldout" / "en.jsonl"),
           "--output-dir", str(out), "--report-md", str(report_md),
           "--params", json.dumps({"vocab_size": 44000, "categories": ["zh_web"]})]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def make_shards(corpus: Path, out: Path, copies: int) -> dict[str, list[str]]:
    """``copies`` parquet shards (column ``text``) per corpus file; the file's stem is its pack category.

    Copies make the workload larger than the fixed costs (tokenizer loading, process start-up)
    without inventing text: each copy is the file's documents again.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards: dict[str, list[str]] = {}
    for f in sorted(corpus.glob("*.jsonl")):
        dest = out / f.stem / f"{f.stem}.parquet"
        if not dest.exists():
            texts = [json.loads(line)["text"] for line in f.open(encoding="utf-8") if line.strip()]
            dest.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), dest)
        shards[f.stem] = [str(dest)]
        for i in range(1, copies):
            copy = out / f.stem / f"{f.stem}_copy{i}.parquet"
            if not copy.exists():
                shutil.copyfile(dest, copy)
            shards[f.stem].append(str(copy))
    if not shards:
        raise SystemExit(f"{corpus}: no *.jsonl files")
    return shards


# ----------------------------------------------------------------------------- workers (one subprocess each)
def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its reaped children (map workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def worker_cptflow(args: argparse.Namespace, shards: dict[str, list[str]], out: Path) -> dict:
    import datasets  # noqa: F401  (imports are not timed on either side)
    import transformers  # noqa: F401

    from cptflow.pack import encoder, pack, pack_shard
    from cptflow.pack.pack import PackConfig

    cfg = PackConfig(max_length=args.max_length, num_threads=args.threads)
    t0, c0 = time.perf_counter(), cpu_seconds()
    encoder.run(cfg, args.tokenizer, out / "encoder")  # the workflow's pack_encoder job, once per run
    t_encoder = time.perf_counter() - t0
    dirs, docs = [], 0
    for cat in sorted(shards):
        for i, f in enumerate(shards[cat]):
            dirs.append(out / "shards" / f"{cat}-{i}")
            docs += int(pack_shard.run(cfg, out / "encoder", f, cat, dirs[-1])["docs_in"])
    t_shards = time.perf_counter() - t0
    pack.run(cfg, dirs, out / "data", out / "counts.json")
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    counts = json.loads((out / "counts.json").read_text())
    cats = counts["categories"].values()
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    # Where the time went, measured after the clock stopped on the same (now warm) process.
    from cptflow.pack.encoder import load_encoder
    from cptflow.pack.splice import read_batches

    t1 = time.perf_counter()
    backend, _ = load_encoder(out / "encoder", cfg)
    t2 = time.perf_counter()
    for c in sorted(shards):
        for f in shards[c]:
            for texts in read_batches(f, cfg.batch_docs):
                backend.encode_batch_fast(texts, add_special_tokens=False)
    t3 = time.perf_counter()
    return {"seconds": seconds, "cpu_s": cpu, "encoder_s": t_encoder, "open_s": t2 - t1, "encode_s": t3 - t2,
            "shards": len(dirs), "docs": docs, "layout_s": seconds - t_shards,
            "doc_tokens": sum(c["doc_tokens"] for c in cats), "rows": counts["total"]["samples"],
            "padding_tokens": counts["total"]["padding_tokens"], "disk_bytes": disk}


def worker_hf(args: argparse.Namespace, shards: dict[str, list[str]], out: Path) -> dict:
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    block = args.max_length
    files = [f for c in sorted(shards) for f in shards[c]]
    t0, c0 = time.perf_counter(), cpu_seconds()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    raw = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(out / "cache"))

    def tokenize_function(examples):  # as run_clm.py
        return tok(examples["text"])

    # Every input column removed, as run_clm.py does: group_texts concatenates every column it is given and
    # cuts by the first one's length, so a kept `id` column would make it cut (and work on) the wrong thing.
    tokenized = raw.map(tokenize_function, batched=True, num_proc=args.threads, remove_columns=raw.column_names,
                        load_from_cache_file=False)

    def group_texts(examples):  # run_clm.py's group_texts, unchanged in substance
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block) * block
        result = {k: [t[i: i + block] for i in range(0, total_length, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=args.threads, load_from_cache_file=False)
    grouped.save_to_disk(str(out / "data"))
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    disk = sum(p.stat().st_size for p in (out / "data").rglob("*") if p.is_file())
    # Counted after the clock stops: tokens per document minus the BOS the tokenizer added.
    n_special = len(tok("x")["input_ids"]) - len(tok("x", add_special_tokens=False)["input_ids"])
    lens = [len(x) for x in tokenized["input_ids"]]
    return {"seconds": seconds, "cpu_s": cpu, "docs": len(raw), "doc_tokens": sum(lens) - n_special * len(lens),
            "rows": len(grouped), "dropped_tokens": sum(lens) - len(grouped) * block, "disk_bytes": disk}


def run_jobs(args: argparse.Namespace, shards: dict[str, list[str]], out: Path) -> dict:
    """cptflow as the workflow runs it: one process per job (pack_encoder, each pack_shard, pack), one after
    the other, each with interpreter start and its imports on the clock."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    params = json.dumps({"max_length": args.max_length})
    py = [sys.executable, "-m"]
    cmds = [py + ["cptflow.pack.encoder", "--tokenizer", args.tokenizer, "--output-dir", str(out / "encoder"),
                  "--params", params]]
    dirs = []
    for cat in sorted(shards):
        for i, f in enumerate(shards[cat]):
            dirs.append(str(out / "shards" / f"{cat}-{i}"))
            cmds.append(py + ["cptflow.pack.pack_shard", "--encoder", str(out / "encoder"), "--input", f,
                              "--category", cat, "--threads", str(args.threads), "--output-dir", dirs[-1],
                              "--params", params])
    cmds.append(py + ["cptflow.pack.pack", "--shards", *dirs, "--output-dir", str(out / "data"), "--counts",
                      str(out / "counts.json"), "--params", params])
    t0, c0 = time.perf_counter(), cpu_seconds()
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[2:4])} failed:\n{proc.stderr[-3000:]}")
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    counts = json.loads((out / "counts.json").read_text())
    res = {"seconds": seconds, "cpu_s": cpu, "jobs": len(cmds), "shards": len(dirs), "rows": counts["total"]["samples"],
           "doc_tokens": sum(c["doc_tokens"] for c in counts["categories"].values()),
           "disk_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()), "peak_rss_mb": float("nan")}
    shutil.rmtree(out, ignore_errors=True)
    return res


def run_worker(args: argparse.Namespace, kind: str, shards: dict[str, list[str]], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, __file__, "--worker", kind, "--tokenizer", args.tokenizer,
           "--max-length", str(args.max_length), "--threads", str(args.threads), "--out", str(out),
           "--shards-json", json.dumps(shards)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- main
def report(args: argparse.Namespace, runs: dict[str, list[dict]], chars: int, vocab: int,
           tok_seconds: float | None, compression_md: str, special_docs: int) -> str:
    import datasets
    import tokenizers
    import transformers

    from cptflow.pack import pack, pack_shard

    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    tps = {k: runs[k][0]["doc_tokens"] / med[k] for k in runs}
    cpu = {k: statistics.median(r["cpu_s"] for r in v) for k, v in runs.items()}
    tpc = {k: runs[k][0]["doc_tokens"] / cpu[k] for k in runs}
    enc_s = statistics.median(r["encode_s"] for r in runs["cptflow"])
    open_s = statistics.median(r["open_s"] for r in runs["cptflow"])
    encoder_s = statistics.median(r["encoder_s"] for r in runs["cptflow"])
    names = {"cptflow": f"cptflow `pack_encoder` + `pack_shard` per shard + `pack` layout (num_threads={args.threads})",
             "jobs": f"the same as workflow jobs: {runs['jobs'][0]['jobs']} processes one after the other "
                     "(interpreter start and imports included)",
             "hf": f"`datasets` map, run_clm style (num_proc={args.threads})"}
    lines = [
        "## pack: tokenize + pack throughput", "",
        run_info("pack.py", args.load_start),
        f"Versions: datasets {datasets.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, cptflow.pack.pack_shard VERSION {pack_shard.VERSION}, "
        f"cptflow.pack.pack VERSION {pack.VERSION}.", "",
        f"Text: `{args.corpus}` ({', '.join(sorted(p.stem for p in Path(args.corpus).glob('*.jsonl')))}; "
        f"{runs['cptflow'][0]['docs']} documents, {chars / 1e6:.2f} M characters), converted to parquet, each file "
        f"given {args.copies} time(s) as separate shards (`--copies`) so the work outweighs fixed start-up costs. "
        f"Tokenizer: demo tokenizer expanded to {vocab} pieces (below). Rows of {args.max_length} tokens. "
        f"Median of {args.repeats} runs each, alternating, each in a fresh process; clock from tokenizer load "
        "to dataset on disk.", "",
        "| pipeline | doc tokens | output rows | wall s (median) | wall s (min–max) | doc tokens/s (wall) "
        "| CPU s (median) | doc tokens per CPU-s | output bytes per doc token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ("cptflow", "jobs", "hf"):
        s = [r["seconds"] for r in runs[k]]
        lines.append(f"| {names[k]} | {runs[k][0]['doc_tokens']:,} | {runs[k][0]['rows']:,} | {med[k]:.2f} | "
                     f"{min(s):.2f}–{max(s):.2f} | {tps[k]:,.0f} | {cpu[k]:.2f} | {tpc[k]:,.0f} | "
                     f"{runs[k][0]['disk_bytes'] / runs[k][0]['doc_tokens']:.2f} |")
    diff = runs["hf"][0]["doc_tokens"] - runs["cptflow"][0]["doc_tokens"]
    lines += [
        "", f"**Ratio: cptflow's pack is {tps['cptflow'] / tps['hf']:.2f}x the wall-clock tokens/s and "
        f"{tpc['cptflow'] / tpc['hf']:.2f}x the tokens per CPU-second of the datasets.map baseline; run as "
        f"workflow jobs (each process's start and imports counted, the baseline's imports not), "
        f"{tps['jobs'] / tps['hf']:.2f}x and {tpc['jobs'] / tpc['hf']:.2f}x.** "
        "CPU seconds (user + system, all threads and worker processes) vary less than wall time when other "
        "jobs share the two cores; wall time is what a user waits on an idle machine.", "",
        "What each side does beyond the common work: cptflow adds BOS+EOS per document, records document "
        "starts and row lengths (training derives position ids and labels from them), pads each shard's "
        "last row, shuffles rows into 10 mixed buckets (an index, no copy) and writes "
        f"{runs['cptflow'][0]['shards']} shards of token ids (4 bytes here: the vocabulary passes 65,536 ids; 2 "
        "below); the baseline adds BOS only (the "
        "tokenizer's default), `attention_mask` and `labels`, and drops each 1000-document batch's "
        f"remainder ({runs['hf'][0]['dropped_tokens']:,} tokens here). Where the time goes: cptflow calls the "
        "Rust `encode_batch_fast` directly (no offsets, no Python `BatchEncoding`) and splices with numpy; "
        "the baseline builds Python lists per token in `group_texts` and pays process start-up and "
        "arrow round trips for each `map`.",
        f"Inside cptflow's time: `encode_batch_fast` itself takes {enc_s:.2f} s "
        f"(median, re-measured in the same process after the run); the `pack_encoder` step (transformers' "
        f"tokenizer loaded once, its Rust backend and special ids written) {encoder_s:.2f} s; opening that encoder "
        f"(`cptflow.pack.encoder.load_encoder`, `tokenizers` only) {open_s:.2f} s per call, which `pack_shard` "
        f"makes once per shard ({runs['cptflow'][0]['shards']} here, as one job each would); the layout step "
        f"{statistics.median(r['layout_s'] for r in runs['cptflow']):.2f} s; the rest of the median wall time "
        "(reading, splicing, writing) is "
        f"{med['cptflow'] - enc_s - encoder_s - runs['cptflow'][0]['shards'] * open_s:.2f} s.",
        f"Token counts differ by {diff:+,}: cptflow encodes a literal `<s>`/`</s>` in the text as text "
        "(`cptflow.pack.encoder.load_encoder`), the plain tokenizer turns it into one special token "
        f"({special_docs} document(s) of this text contain one).", "",
        "### Expanded demo tokenizer (`python -m cptflow.tokenizer.vocab`, vocab_size 44000 on zh_web"
        + (f", built in {tok_seconds:.1f} s" if tok_seconds is not None else ", reused from bench/_work/pack/")
        + ")", "", compression_md.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="/work/shared/data/corpus", help="folder of *.jsonl with a 'text' field")
    p.add_argument("--repeats", type=int, default=5, help="runs per pipeline (median reported)")
    p.add_argument("--copies", type=int, default=3, help="each corpus file is read this many times (>= 1)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per packed row (block_size)")
    p.add_argument("--threads", type=int, default=2, help="tokenizer threads (cptflow) / num_proc (datasets)")
    p.add_argument("--tokenizer", default=str(WORK / "tokenizer"), help="expanded tokenizer (built if missing)")
    p.add_argument("--no-write", action="store_true", help="print the table only, leave RESULTS.md alone")
    p.add_argument("--worker", choices=("cptflow", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--shards-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.load_start = os.getloadavg()

    if args.worker:
        fn = worker_cptflow if args.worker == "cptflow" else worker_hf
        res = fn(args, json.loads(args.shards_json), Path(args.out))
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    WORK.mkdir(parents=True, exist_ok=True)
    report_md = WORK / "tokenizer_compression.md"
    tok_seconds = None
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        print(f"building the expanded tokenizer into {args.tokenizer} ...", file=sys.stderr)
        tok_seconds = build_tokenizer(Path(args.tokenizer), report_md)
    shards = make_shards(Path(args.corpus), WORK / "shards", args.copies)
    import pyarrow.parquet as pq

    texts = [t for fs in shards.values() for f in fs for t in pq.read_table(f).column("text").to_pylist()]
    chars = sum(map(len, texts))
    special_docs = sum(("<s>" in t) or ("</s>" in t) for t in texts)
    del texts
    vocab = len(json.loads((Path(args.tokenizer) / "tokenizer.json").read_text())["model"]["vocab"])
    runs: dict[str, list[dict]] = {"cptflow": [], "jobs": [], "hf": []}
    for i in range(args.repeats):
        for kind in ("cptflow", "jobs", "hf"):
            res = (run_jobs(args, shards, WORK / "run_jobs") if kind == "jobs"
                   else run_worker(args, kind, shards, WORK / f"run_{kind}"))
            runs[kind].append(res)
            print(f"run {i + 1}/{args.repeats} {kind}: {res['seconds']:.2f} s ({res['cpu_s']:.2f} CPU s), "
                  f"{res['doc_tokens']:,} doc tokens, "
                  f"{res['rows']:,} rows, peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
    compression = report_md.read_text(encoding="utf-8") if report_md.exists() else "(compression report missing)"
    md = report(args, runs, chars, vocab, tok_seconds, compression, special_docs)
    print(md)
    if not args.no_write:
        write_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
