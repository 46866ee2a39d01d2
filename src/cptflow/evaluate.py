"""Eval stage: multiple-choice accuracy and bits per character of one model; ``compare`` puts models side by side.

One run per model (``--name base`` / ``--name adapted``) so each is a Snakemake job that can run on
its own node; ``compare`` then joins their results into one table (JSON + markdown) for the report.
Every benchmark result carries what is needed to reproduce it: split, template name and hash, the
few-shot question ids per subject, the scorings and the token ids the option letters resolved to.
Scoring details live in ``cptflow.mc_eval``, the bpc scheme in ``cptflow.bpc``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from cptflow import bpc, mc_eval
from cptflow.benchmarks import BenchmarkSpec, read_questions
from cptflow.cli import stage_main
from cptflow.config import ConfigError, from_dict, load_params, to_dict
from cptflow.io import PathLike, atomic_path, read_json, write_json, write_jsonl
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
log = logging.getLogger("cptflow.evaluate")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8  # sequences per forward pass
    max_length: int = 0  # context in tokens; 0: the model's max_position_embeddings
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA; or float32|bfloat16|float16
    max_questions_per_subject: int = 0  # 0: all; >0 takes the first N (quick demo runs)
    bpc_window_tokens: int = 0  # input tokens per bpc window; 0: the context length
    bpc_stride_tokens: int = 0  # advance of the bpc window; 0: half the window
    max_heldout_docs: int = 0  # 0: all documents of each held-out file
    subject_names: dict[str, str] = field(default_factory=dict)  # subject -> name in prompts (default: "_" -> " ")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("eval.batch_size must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"eval.dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.bpc_stride_tokens and self.bpc_window_tokens and self.bpc_stride_tokens > self.bpc_window_tokens:
            raise ConfigError("eval.bpc_stride_tokens must not exceed eval.bpc_window_tokens")


def load_model(model_dir: PathLike, cfg: EvalConfig):
    """Tokenizer and model from a Hugging Face directory, in eval mode on the configured device/dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    log.info("model %s on %s in %s, vocab %d, context %d", model_dir, device, dtype, len(tok),
             model.config.max_position_embeddings)
    return tok, model


def context_length(model, cfg: EvalConfig) -> int:
    return cfg.max_length or int(model.config.max_position_embeddings)


def pad_id_of(tok) -> int:
    """Any id works (padding is masked); prefer the tokenizer's own pad, then EOS."""
    return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)


def accuracy(rows: list[dict]) -> dict[str, float]:
    return {s: round(sum(r[s] == r["answer"] for r in rows) / len(rows), 6) for s in mc_eval.SCORINGS}


def summarise(rows: list[dict], categories: dict[str, str], default_category: str) -> dict[str, Any]:
    """Accuracy per subject, per category and overall (micro over questions, macro over subjects)."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r)
    by_cat: dict[str, list[dict]] = defaultdict(list)
    subjects = {}
    for s in sorted(by_subject):
        cat = categories.get(s, default_category)
        by_cat[cat].extend(by_subject[s])
        subjects[s] = {"category": cat, "n": len(by_subject[s]), "accuracy": accuracy(by_subject[s])}
    macro = {k: round(sum(v["accuracy"][k] for v in subjects.values()) / max(1, len(subjects)), 6)
             for k in mc_eval.SCORINGS}
    return {"subjects": subjects,
            "categories": {c: {"n": len(v), "accuracy": accuracy(v)} for c, v in sorted(by_cat.items())},
            "overall": {"n": len(rows), "accuracy": accuracy(rows) if rows else {}, "macro_accuracy": macro}}


def evaluate_benchmark(model, tok, spec: BenchmarkSpec, cfg: EvalConfig) -> tuple[dict[str, Any], list[dict]]:
    """Score one benchmark's eval split k-shot from its dev split; returns (summary, per-question rows)."""
    t = mc_eval.TEMPLATES["zh" if spec.lang.startswith("zh") else "en"]
    dev: dict[str, list] = defaultdict(list)
    if spec.shots:
        for q in read_questions(spec, spec.dev_split):
            if q.answer is not None and len(dev[q.subject]) < spec.shots:
                dev[q.subject].append(q)
    items, unlabeled, per_subject = [], 0, Counter()
    max_len = context_length(model, cfg)
    for q in read_questions(spec, spec.eval_split):
        if q.answer is None:
            unlabeled += 1
            continue
        if cfg.max_questions_per_subject and per_subject[q.subject] >= cfg.max_questions_per_subject:
            continue
        per_subject[q.subject] += 1
        name = cfg.subject_names.get(q.subject, q.subject.replace("_", " "))
        items.append(mc_eval.prepare(tok, t, name, dev[q.subject], q, max_len))
    if unlabeled:
        log.warning("%s/%s: %d questions without an answer skipped (unpublished labels: score another split)",
                    spec.name, spec.eval_split, unlabeled)
    if not items:
        raise ValueError(f"benchmark {spec.name}: no labelled questions in split {spec.eval_split!r} ({spec.path})")
    rows = mc_eval.score_items(model, items, cfg.batch_size, pad_id_of(tok))
    letter_ids = mc_eval.letter_id_summary(tok, items)
    log.info("%s: letter tokens %s", spec.name, letter_ids)
    summary = {
        "benchmark": spec.name, "path": spec.path, "lang": spec.lang, "split": spec.eval_split,
        "dev_split": spec.dev_split, "shots": spec.shots,
        "template": {"name": t.name, "sha256": mc_eval.template_hash(t), "version": mc_eval.TEMPLATE_VERSION},
        "scorings": {"first_token": "argmax of next-token logits over the option letters (shots answered by letter)",
                     "option_loglik": "argmax of summed log-prob of the option text after the cue (shots answered "
                                      "by text)",
                     "option_loglik_norm": "option_loglik divided by the option text's characters"},
        "fewshot_ids": {s: [q.qid for q in qs] for s, qs in sorted(dev.items())},
        "shots_used_mean": {"first_token": round(sum(it.letter_shots for it in items) / len(items), 3),
                            "option_loglik": round(sum(it.text_shots for it in items) / len(items), 3)},
        "truncated_questions": sum(it.truncated > 0 for it in items), "unlabeled_skipped": unlabeled,
        "letter_token_ids": letter_ids, "context_length": max_len,
        **summarise(rows, spec.categories, spec.name),
    }
    return summary, rows


def run(cfg: EvalConfig, model_dir: PathLike, name: str, benchmarks: list[BenchmarkSpec],
        heldout: dict[str, PathLike], output: PathLike, predictions: PathLike | None = None) -> Stats:
    """Evaluate one model; writes the results JSON (and per-question predictions JSONL if asked)."""
    stats = Stats()
    tok, model = load_model(model_dir, cfg)
    results: dict[str, Any] = {"model": name, "model_dir": str(model_dir), "eval_version": VERSION,
                               "params": to_dict(cfg), "vocab_size": len(tok), "benchmarks": {}, "heldout": {}}
    all_rows: list[dict] = []
    for spec in benchmarks:
        summary, rows = evaluate_benchmark(model, tok, spec, cfg)
        results["benchmarks"][spec.name] = summary
        all_rows.extend(rows)
        stats.update("questions", len(rows))
        stats.update("questions_truncated", summary["truncated_questions"])
        log.info("%s: %s", spec.name, summary["overall"])
    window = cfg.bpc_window_tokens or context_length(model, cfg)
    stride = cfg.bpc_stride_tokens or max(1, window // 2)
    for set_name, path in sorted(heldout.items()):
        texts = bpc.read_texts(path, max_docs=cfg.max_heldout_docs)
        res = bpc.bits_per_char(model, tok, texts, window=window, stride=stride, batch_size=cfg.batch_size,
                                pad_id=pad_id_of(tok))
        results["heldout"][set_name] = {"path": str(path), **res}
        stats.update("heldout_docs", res["docs"])
        stats.update("heldout_chars", res["chars"])
        log.info("%s: bpc %.4f, tokens/char %.4f", set_name, res["bpc"], res["tokens_per_char"])
    write_json(output, results)
    if predictions:
        write_jsonl(predictions, ({"model": name, **r} for r in all_rows))
    return stats


def compare(results: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Side-by-side table of several models' results: (JSON-able dict, markdown)."""
    names = [r["model"] for r in results]
    rows: list[dict[str, Any]] = []
    benches = sorted({b for r in results for b in r["benchmarks"]})
    for b in benches:
        levels = [("overall", "overall", lambda s: s["overall"])]
        first = next(r["benchmarks"][b] for r in results if b in r["benchmarks"])
        levels += [("category", c, lambda s, c=c: s["categories"].get(c)) for c in first["categories"]]
        levels += [("subject", s_, lambda s, s_=s_: s["subjects"].get(s_)) for s_ in first["subjects"]]
        for level, key, get in levels:
            row = {"benchmark": b, "level": level, "group": key, "models": {}}
            for r in results:
                part = get(r["benchmarks"][b]) if b in r["benchmarks"] else None
                row["models"][r["model"]] = {"n": part["n"], **part["accuracy"]} if part else None
            rows.append(row)
    held = sorted({h for r in results for h in r["heldout"]})
    heldout = [{"set": h, "models": {r["model"]: {k: r["heldout"][h][k] for k in ("bpc", "tokens_per_char")}
                                     if h in r["heldout"] else None for r in results}} for h in held]
    table = {"models": names, "accuracy": rows, "heldout": heldout,
             "templates": {b: {r["model"]: r["benchmarks"][b]["template"]["sha256"] for r in results
                               if b in r["benchmarks"]} for b in benches}}
    return table, markdown(table)


def _fmt(v: Any, pct: bool = True) -> str:
    return "—" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.4f}")


def markdown(table: dict[str, Any]) -> str:
    names = table["models"]
    delta = len(names) == 2
    lines = ["## Multiple choice accuracy (%)", "",
             "first token = argmax over option letters; loglik = option text log-likelihood (norm: per character)", ""]
    head = ["benchmark", "group", "n"] + [f"{n} {s}" for s in ("first token", "loglik", "loglik norm") for n in names]
    if delta:
        head += [f"Δ {s}" for s in ("first token", "loglik")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["accuracy"]:
        ms = [row["models"][n] for n in names]
        n_q = next((m["n"] for m in ms if m), 0)
        group = row["group"] if row["level"] != "subject" else f"· {row['group']}"
        cells = [row["benchmark"], f"**{group}**" if row["level"] == "overall" else group, str(n_q)]
        for s in mc_eval.SCORINGS:
            cells += [_fmt(m[s] if m else None) for m in ms]
        if delta:
            for s in ("first_token", "option_loglik"):
                cells.append(f"{100 * (ms[1][s] - ms[0][s]):+.1f}" if all(ms) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Held-out text (lower is better)", "",
              "| set | " + " | ".join(f"{n} bpc" for n in names) + " | " + " | ".join(f"{n} tok/char" for n in names)
              + " |", "|" + "---|" * (1 + 2 * len(names))]
    for h in table["heldout"]:
        ms = [h["models"][n] for n in names]
        lines.append("| " + " | ".join([h["set"]] + [_fmt(m["bpc"] if m else None, False) for m in ms]
                                       + [_fmt(m["tokens_per_char"] if m else None, False) for m in ms]) + " |")
    return "\n".join(lines) + "\n"


def _specs(text: str) -> list[BenchmarkSpec]:
    raw = load_params(text) if text else []
    raw = raw.get("benchmarks", raw) if isinstance(raw, dict) else raw
    return [from_dict(BenchmarkSpec, b, f"benchmarks[{i}]") for i, b in enumerate(raw)]


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory (with its tokenizer)")
    p.add_argument("--name", required=True, help="label of this model in tables (base, adapted, ...)")
    p.add_argument("--benchmarks-json", "--benchmarks", dest="benchmarks_json", default="",
                   help="the top-level benchmarks list (BenchmarkSpec dicts) as JSON, or @file.(json|yaml)")
    p.add_argument("--heldout", action="append", default=[], metavar="NAME=PATH", help="held-out JSONL ('text')")
    p.add_argument("--output", required=True, help="results JSON")
    p.add_argument("--predictions", default=None, help="optional per-question predictions JSONL")
    p.add_argument("--stats", default=None, help="provenance manifest (default: <output>.stats.json)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(EvalConfig, params, "eval")
    specs = _specs(args.benchmarks_json)
    heldout = dict(h.split("=", 1) for h in args.heldout)
    with Timer() as t:
        stats = run(cfg, args.model, args.name, specs, heldout, args.output, args.predictions)
    write_manifest(args.stats or f"{args.output}.stats.json", stage="eval", version=VERSION, params=to_dict(cfg),
                   inputs=[args.model, *(s.path for s in specs), *heldout.values()], stats=stats,
                   seconds=t.seconds, outputs=[args.output])


def _build_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", nargs="+", required=True, help="results JSON of each model, base first")
    p.add_argument("--output-json", required=True)
    p.add_argument("--output-md", required=True)


def _run_compare(args: argparse.Namespace, params: dict[str, Any]) -> None:
    table, md = compare([read_json(p) for p in args.results])
    write_json(args.output_json, table)
    with atomic_path(args.output_md) as tmp:
        tmp.write_text(md, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return stage_main("eval.compare", argv[1:], _build_compare, _run_compare)
    return stage_main("eval", argv, _build, _run)


if __name__ == "__main__":
    sys.exit(main())
