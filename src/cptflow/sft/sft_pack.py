"""Stage ``sft_pack``: conversations → chat template → token ids with a loss mask on every assistant turn → rows.

Reads the ``conversations`` stage's files in order, with the tokenizer of the model SFT starts from:

1. the chat template (``cptflow.sft.template``: the tokenizer's own, else the base tokenizer's, else
   Firefly's, or a file), written
   to ``--template`` and its sha256 into the counts and the manifest: finetune installs it into the model;
2. each conversation rendered and tokenized once; the loss mask covers every assistant turn (all turns
   trained in one pass, as Firefly does) and nothing else;
3. a conversation longer than ``max_length`` is cut at the end of its last assistant turn that fits;
   when not even the first reply fits, the first user turn is kept whole and that reply cut; when the
   first user turn alone does not fit, the conversation is dropped. All three are counted;
4. conversations packed whole into rows (``cptflow.sft.packed``: the training stage's packed format, labels
   -100 off the mask, position ids restarting per conversation).

The conversation files are checked against the ``conversations`` stage's manifests before they are read
(``cptflow.core.provenance``).

Output: the packed dataset (``cptflow.sft.packed``), ``--counts`` JSON and the manifest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import atomic_path, iter_jsonl, write_json
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.model.hf import TOKENIZER_FILES, load_tokenizer
from cptflow.sft import packed
from cptflow.sft.config import SftPackConfig
from cptflow.sft.template import Unencodable, encode, fit, resolve_template, special_token_pattern, template_sha256

VERSION = 3  # 3: the training stage's memory-mapped packed format (issue #10)
log = logging.getLogger("cptflow.sft.sft_pack")


def encode_all(cfg: SftPackConfig, tokenizer: Any, template: str, files: Sequence[str | Path],
               stats: Stats) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Encode and fit every conversation of ``files``; returns ids, masks and conversation ids kept."""
    special = special_token_pattern(tokenizer)
    ids, masks, names = [], [], []
    for path in files:
        for rec in iter_jsonl(path):
            stats.update("docs_in")
            stats.update("turns_in", sum(m["role"] == "assistant" for m in rec["messages"]))
            try:
                enc = encode(tokenizer, template, rec["messages"], special)
                keep, how = fit(enc, cfg.max_length)
            except Unencodable as e:
                stats.drop(e.reason, sum(len(m["content"]) for m in rec["messages"]))
                log.debug("%s dropped: %s (%s)", rec["id"], e.reason, e)
                continue
            stats.update(f"fit/{how}")
            stats.update("turns_out", sum(k <= keep for k in enc.turn_ends) + (how == "reply_cut"))
            stats.update("tokens_cut", len(enc.input_ids) - keep)
            ids.append(enc.input_ids[:keep])
            masks.append(enc.loss_mask[:keep])
            names.append(rec["id"])
            stats.update("docs_out")
    return ids, masks, names


def run(cfg: SftPackConfig, tokenizer_dir: str | Path, files: Sequence[str | Path], output_dir: str | Path,
        template_path: str | Path, counts_path: str | Path,
        base_tokenizer_dir: str | Path | None = None) -> tuple[Stats, dict[str, Any]]:
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no EOS token; SFT needs one to end every answer")
    base = load_tokenizer(base_tokenizer_dir) if base_tokenizer_dir and cfg.chat_template == "auto" else None
    template, origin = resolve_template(cfg.chat_template, tokenizer, base)
    sha = template_sha256(template)
    log.info("chat template: %s (sha256 %s)", origin, sha[:16])
    stats = Stats()
    ids, masks, names = encode_all(cfg, tokenizer, template, files, stats)
    if not ids:
        raise ValueError(f"no conversation left to train on (dropped: {stats.to_dict()}); see the counts")
    plan = packed.plan_rows([len(x) for x in ids], cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_ids, rows_mask, real, starts = packed.build_rows(ids, masks, plan, cfg.max_length, int(pad_id))
    with atomic_path(output_dir) as tmp:
        fingerprint = packed.write(tmp, rows_ids, rows_mask, real, starts, [[names[i] for i in r] for r in plan])
    with atomic_path(template_path) as tmp:
        tmp.write_text(template, encoding="utf-8")
    tokens = int(sum(len(x) for x in ids))
    counts = {"format_version": packed.FORMAT_VERSION, "max_length": cfg.max_length, "rows": len(plan),
              "conversations": len(ids), "tokens": tokens, "loss_tokens": int(sum(int(m.sum()) for m in masks)),
              "padding_tokens": len(plan) * cfg.max_length - tokens,
              "fill": round(tokens / (len(plan) * cfg.max_length), 4),
              "fit": stats.under("fit"),
              "dropped": stats.under("dropped"),
              "chat_template_origin": origin, "chat_template_sha256": sha, "fingerprint": fingerprint}
    write_json(counts_path, counts)
    for k in ("rows", "tokens", "loss_tokens", "padding_tokens"):
        stats.update(k, counts[k])
    log.info("%d conversations -> %d rows of %d (fill %.1f%%); %d loss tokens; fit %s; dropped %s", len(ids),
             len(plan), cfg.max_length, 100 * counts["fill"], counts["loss_tokens"], counts["fit"], counts["dropped"])
    return stats, counts


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="directory of the tokenizer (the model SFT starts from)")
    p.add_argument("--base-tokenizer", default=None, help="the base model's tokenizer: its chat template is "
                   "the fallback of chat_template: auto")
    p.add_argument("--conversations", required=True, nargs="+", help="conversations stage outputs (JSONL)")
    p.add_argument("--output-dir", required=True, help="packed dataset directory")
    p.add_argument("--template", required=True, help="where to write the chat template used (.jinja)")
    p.add_argument("--counts", required=True, help="JSON: rows, tokens, loss tokens, truncation, template hash")
    p.add_argument("--stats", required=True, help="provenance manifest (JSON)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(SftPackConfig, params, "sft.sft_pack")
    verify_inputs(args.conversations)  # each against its conversations-stage manifest (x.jsonl -> x.stats.json)
    with Timer() as t:
        stats, counts = run(cfg, args.tokenizer, args.conversations, args.output_dir, args.template, args.counts,
                            args.base_tokenizer)
    # The tokenizers' files only: hashing the whole start model (GBs) would say nothing more.
    tok_files = [Path(d) / f for d in (args.tokenizer, args.base_tokenizer) if d for f in TOKENIZER_FILES
                 if (Path(d) / f).is_file()]
    write_manifest(args.stats, stage="sft_pack", version=VERSION, params=to_dict(cfg),
                   inputs=[*tok_files, *args.conversations], stats=stats, seconds=t.seconds,
                   outputs=[args.output_dir, args.template, args.counts],
                   extra={"chat_template_sha256": counts["chat_template_sha256"],
                          "chat_template_origin": counts["chat_template_origin"]})


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("sft_pack", argv, _build, _run, "Template, mask and pack conversations for SFT.")


if __name__ == "__main__":
    sys.exit(main())
