"""Stage ``evaluate``: multiple-choice accuracy and bits per character of one model (``compare`` joins models).

One run per model (``--name base``, ``--name <train stage>``: the workflow evaluates the base and the
output of every training stage) so each is a Snakemake job that can run on
its own node; ``compare`` then joins their results into one table (JSON + markdown) for the report.
Every benchmark result carries what is needed to reproduce it: split, the template (every field) and
its hash, the subject names the prompts used, the few-shot question ids per subject, the scorings and
the token ids the option letters resolved to; every accuracy carries its binomial standard error, and
the per-question right/wrong strings let ``compare`` pair models question by question. Templates live in
``cptflow.eval.templates``, scoring in ``cptflow.eval.multiple_choice``, the bpc scheme in ``cptflow.eval.bpc``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from cptflow.eval import bpc
from cptflow.eval import multiple_choice as mc_eval
from cptflow.eval import templates
from cptflow.eval.benchmarks import BenchmarkSpec, read_questions
from cptflow.eval.summary import correctness, summarise
from cptflow.core.cli import stage_main
from cptflow.core.config import ConfigError, from_dict, load_params, to_dict
from cptflow.core.io import PathLike, write_json, write_jsonl
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest

VERSION = 2
log = logging.getLogger("cptflow.eval.evaluate")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 8  # sequences per forward pass
    max_length: int = 0  # context in tokens; 0: the model's max_position_embeddings
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA; or float32|bfloat16|float16
    max_questions_per_subject: int = 0  # 0: all; >0 takes the first N (quick demo runs)
    bpc_window_tokens: int = 0  # input tokens per bpc window; 0: the context length
    bpc_stride_tokens: int = 0  # advance of the bpc window; 0: half the window
    max_heldout_docs: int = 0  # 0: all documents of each held-out file

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("evaluate.batch_size must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"evaluate.dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.bpc_stride_tokens and self.bpc_window_tokens and self.bpc_stride_tokens > self.bpc_window_tokens:
            raise ConfigError("evaluate.bpc_stride_tokens must not exceed evaluate.bpc_window_tokens")


def load_model(model_dir: PathLike, cfg: EvaluateConfig):
    """Tokenizer and model from a Hugging Face directory, in eval mode on the configured device/dtype."""
    from cptflow.model.hf import load_tokenizer
    from cptflow.model.loader import load_causal_lm  # the one safe loader: safetensors only, every tensor loaded

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype, device=device)
    log.info("model %s on %s in %s, vocab %d, context %d", model_dir, device, dtype, len(tok),
             model.config.max_position_embeddings)
    return tok, model


def context_length(model, cfg: EvaluateConfig) -> int:
    return cfg.max_length or int(model.config.max_position_embeddings)


def pad_id_of(tok) -> int:
    """Any id works (padding is masked); prefer the tokenizer's own pad, then EOS."""
    return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)


def evaluate_benchmark(model, tok, spec: BenchmarkSpec, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[dict]]:
    """Score one benchmark's eval split k-shot from its dev split; returns (summary, per-question rows)."""
    t = templates.template_for(spec)
    dev: dict[str, list] = defaultdict(list)
    if spec.shots:
        for q in read_questions(spec, spec.dev_split):
            if q.answer is not None and len(dev[q.subject]) < spec.shots:
                dev[q.subject].append(q)
    items, unlabeled, per_subject, names = [], 0, Counter(), {}
    max_len = context_length(model, cfg)
    for q in read_questions(spec, spec.eval_split):
        if q.answer is None:
            unlabeled += 1
            continue
        if cfg.max_questions_per_subject and per_subject[q.subject] >= cfg.max_questions_per_subject:
            continue
        per_subject[q.subject] += 1
        if q.subject not in names:
            names[q.subject] = templates.display_name(spec, t, q.subject)
            if t.subjects and q.subject not in templates.subject_table(t.subjects) | spec.subject_names:
                log.warning("%s: subject %r has no published %s name; the prompt says %r (set subject_names)",
                            spec.name, q.subject, t.subjects, names[q.subject])
        items.append(mc_eval.prepare(tok, t, names[q.subject], dev[q.subject], q, max_len))
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
        "template": {"name": t.name, "sha256": templates.template_hash(t, names), "version": templates.TEMPLATE_VERSION,
                     "fields": templates.describe(t)},
        "subject_names": dict(sorted(names.items())),
        "scorings": {"first_token": "argmax of next-token logits over the option letters (shots answered by letter)",
                     "option_loglik": "argmax of summed log-prob of the option text after the cue (shots answered "
                                      "by text)",
                     "option_loglik_norm": "option_loglik divided by the option text's characters"},
        "fewshot_ids": {s: [q.qid for q in qs] for s, qs in sorted(dev.items())},
        "shots_used_mean": {"first_token": round(sum(it.letter_shots for it in items) / len(items), 3),
                            "option_loglik": round(sum(it.text_shots for it in items) / len(items), 3)},
        "truncated_questions": sum(it.truncated > 0 for it in items), "unlabeled_skipped": unlabeled,
        "letter_token_ids": letter_ids, "context_length": max_len,
        **summarise(rows, lambda s: templates.category_of(spec, t, s)),
        "correct": correctness(rows),
    }
    return summary, rows


def run(cfg: EvaluateConfig, model_dir: PathLike, name: str, benchmarks: list[BenchmarkSpec],
        heldout: dict[str, PathLike], output: PathLike, predictions: PathLike | None = None) -> Stats:
    """Evaluate one model; writes the results JSON (and per-question predictions JSONL if asked)."""
    stats = Stats()
    for spec in benchmarks:  # a bad template or prompt fails before the model is loaded
        templates.template_for(spec)
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
        log.info("%s: bpc %.4f, bpb %.4f, tokens/char %.4f", set_name, res["bpc"], res["bpb"], res["tokens_per_char"])
    write_json(output, results)
    if predictions:
        write_jsonl(predictions, ({"model": name, **r} for r in all_rows))
    return stats


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
    cfg = from_dict(EvaluateConfig, params, "evaluate")
    specs = _specs(args.benchmarks_json)
    heldout = dict(h.split("=", 1) for h in args.heldout)
    verify_inputs([args.model])
    with Timer() as t:
        stats = run(cfg, args.model, args.name, specs, heldout, args.output, args.predictions)
    write_manifest(args.stats or f"{args.output}.stats.json", stage="evaluate", version=VERSION, params=to_dict(cfg),
                   inputs=[args.model, *(s.path for s in specs), *heldout.values()], stats=stats,
                   seconds=t.seconds, outputs=[args.output])


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", argv, _build, _run, "Score one model on the benchmarks and the held-out text.")


if __name__ == "__main__":
    sys.exit(main())
