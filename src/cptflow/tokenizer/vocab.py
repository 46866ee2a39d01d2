"""Stage ``vocab``: expand the base tokenizer for the target language, base ids kept (or pass it through).

LLaMA's tokenizer spends about 1.2 tokens per Chinese character (many characters fall back to 3
byte tokens); Colossal-LLaMA-2's expanded one 0.66. Which ``vocab.method`` applies depends on the
base's tokenizer kind (``cptflow.tokenizer.kind``, also checked when the workflow starts).

SentencePiece BPE bases (LLaMA-2, Mistral-7B, the demo), two ways to add pieces, usable together:

* ``sentencepiece`` (Chinese-LLaMA, Colossal-LLaMA-2): train a SentencePiece model on the cleaned
  target-language text and append its new pieces;
* ``top_chars`` (Ziya): append the most frequent Chinese characters of that text that the base lacks,
  plus an optional user word list.

Pieces are appended after the base vocabulary under the rules of ``cptflow.tokenizer.sp_merge`` (base ids never
move, new pieces score below every base piece), the merge is verified, and the tokenizer is written in
Hugging Face form with a compression report (``cptflow.tokenizer.compression``).

Byte-level BPE bases (LLaMA-3, Qwen2.5, Mistral-Nemo, SmolLM2): ``continued_bpe`` learns new merges on
top of the base's own (``cptflow.tokenizer.bpe_expand``). Any base: ``none`` copies the base's tokenizer
files unchanged (Panda, Chinese-LLaMA-Alpaca-3 adapt without expansion).

Pinned (``vocab.tokenizer: <dir>``, any base): an existing expanded tokenizer (a previous run's) is
checked to extend the base (every base token keeps its id; English keeps its ids) and copied, and
no training text is read: adding data then reruns neither this stage nor ``init_model``.

Outputs: ``--output-dir`` holds only what ``AutoTokenizer.from_pretrained`` reads (tokenizer.json,
tokenizer_config.json, special_tokens_map.json and the chat template(s) if the base has them, and
tokenizer.model for a SentencePiece base), so it can be copied into a model release as is. The
compression report goes to ``--report-json`` / ``--report-md`` (optional) and is always in the
``--stats`` manifest too; for continued_bpe it carries the audit of the new tokens (reachable, used by
held-out text).

SmolLM2-135M (byte-level BPE, 49,152 tokens), continued_bpe on 2 M characters of the shared modern
Chinese: held-out Chinese 1.782 -> 0.754 tokens/char with 16,000 new tokens, English and code ids
unchanged (bench/RESULTS.md, section bpe_vocab).

Demo (all zh_web + zh_books text, ~0.73 M characters, default config, ~0.5 s of training): held-out
modern Chinese 1.250 -> 0.829 tokens/char, vocabulary 32768 -> 60834, English 0.3261 unchanged (same
ids). vocab_size 16000 / 48000 / 64000 give 0.873 / 0.813 / 0.802. 0.70 is out of reach for this text:
only 57% of the held-out adjacent character pairs occur in it at all.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptflow.tokenizer import bpe_expand, compression
from cptflow.tokenizer.compression import iter_texts
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path, write_json
from cptflow.core.provenance import verify_inputs
from cptflow.tokenizer.kind import detect_kind, methods_for
from cptflow.tokenizer.sp_merge import (
    NORMAL, PROBES, WS, append_pieces, has_cjk, load_proto, select_pieces, verify_merge,
)
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.tokenizer.chat_templates import copy_chat_templates, tokenizer_config
from cptflow.tokenizer.sp_to_hf import check_base_config, save_hf_tokenizer, verify_hf
from cptflow.tokenizer.training_text import training_lines
from cptflow.tokenizer.vocab_config import VocabConfig

VERSION = 4  # 3: a bounded training sample and pinned tokenizers; 4: a base's chat_template.jinja (transformers 5) survives
log = logging.getLogger("cptflow.vocab")
#: What ``none`` copies from the base folder, when present (the slow GPT-2 files too: some bases
#: ship only vocab.json + merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")


def train_sentencepiece(lines: Sequence[str], cfg: VocabConfig, base: Any) -> Any:
    """Train a SentencePiece model whose pieces are shaped like the base's (same whitespace rules)."""
    import sentencepiece as spm

    if not lines:
        raise ValueError("no training lines (is the training text empty, or not in the configured lang?)")
    ts, ns = base.trainer_spec, base.normalizer_spec
    spm.set_random_generator_seed(cfg.seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type=cfg.model_type,
            vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
            max_sentence_length=cfg.max_sentence_length, num_threads=cfg.num_threads,
            max_sentencepiece_length=cfg.max_piece_chars, byte_fallback=True, hard_vocab_limit=False,
            # We sample and shuffle ourselves (seeded, streaming); SentencePiece sees every line given.
            input_sentence_size=0, shuffle_input_sentence=False,
            normalization_rule_name="identity", add_dummy_prefix=ns.add_dummy_prefix,
            remove_extra_whitespaces=False, split_digits=ts.split_digits,
            split_by_whitespace=ts.split_by_whitespace, split_by_unicode_script=ts.split_by_unicode_script,
            split_by_number=ts.split_by_number, allow_whitespace_only_pieces=ts.allow_whitespace_only_pieces,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from e
    return load_proto(buf.getvalue())


def read_user_words(path: PathLike) -> list[str]:
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            w = line.strip().replace(" ", WS)
            if w and w not in words:
                words.append(w)
    return words


def candidates(
    cfg: VocabConfig, base: Any, trained: Any | None, char_counts: Counter, user_words: Sequence[str]
) -> list[tuple[str, str]]:
    """``(piece, origin)`` proposals in id order: trained pieces, top characters, user words."""
    out: list[tuple[str, str]] = []
    if trained is not None:
        out += [(p.piece, "sentencepiece") for p in trained.pieces if p.type == NORMAL]
    if cfg.method in ("top_chars", "both"):
        have = {p.piece for p in base.pieces}
        ranked = sorted((-n, ch) for ch, n in char_counts.items() if n >= cfg.min_char_count and ch not in have)
        out += [(ch, "top_chars") for _, ch in ranked[: cfg.max_top_chars]]
    for w in user_words:
        # BPE only reaches a word through pieces that join into it: add its prefixes too.
        out += [(ch, "user_words") for ch in w]
        out += [(w[:k], "user_words") for k in range(2, len(w) + 1)]
    return out


Expansion = tuple[dict[str, Any], Any, Any]  # (manifest facts, base tokenizer, new tokenizer) for the report


def expand_sentencepiece(
    cfg: VocabConfig, base_dir: Path, train_files: Sequence[PathLike], heldout: dict[str, list[str]],
    output_dir: PathLike, stats: Stats,
) -> Expansion:
    """Methods sentencepiece / top_chars / both: append pieces to the base SentencePiece model."""
    base = load_proto((base_dir / "tokenizer.model").read_bytes())
    base_cfg = tokenizer_config(base_dir)  # with the chat template, also where it is kept in chat_template.jinja
    check_base_config(base_cfg, base)
    train_sp = cfg.method in ("sentencepiece", "both")
    sample, char_counts = training_lines(cfg, train_files, stats, train_sp)
    trained = train_sentencepiece(sample, cfg, base) if train_sp else None
    words = read_user_words(cfg.user_words_file) if cfg.user_words_file else []
    sel = select_pieces(base, candidates(cfg, base, trained, char_counts, words), require_cjk=cfg.require_cjk)
    for origin in sel.origin:
        stats.update(f"added/{origin}")
    for reason, n in sel.skipped.items():
        stats.update(f"pieces_skipped/{reason}", n)
    merged = append_pieces(base, sel.pieces)
    zh, en = heldout.get("zh", []), heldout.get("en", [])
    verify_merge(base, merged, zh + en, en if cfg.require_cjk else (), require_cjk=cfg.require_cjk)
    with atomic_path(output_dir) as tmp:
        save_hf_tokenizer(merged, tmp, base_cfg)
        verify_hf(tmp, merged, zh + en)
    info = {"base_vocab_size": len(base.pieces), "vocab_size": len(merged.pieces), "added": len(sel.pieces),
            "trained_vocab_size": len(trained.pieces) if trained else 0}
    return info, compression.sp_tokenizer(base), compression.sp_tokenizer(merged)


def _copy_tokenizer(src: Path, dest: Path) -> tuple[list[str], Any]:
    """Copy the tokenizer files of ``src`` into a new folder ``dest``; (names copied, the tokenizer loaded from it)."""
    from transformers import AutoTokenizer

    dest.mkdir(parents=True)
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dest / name)
    copied += [n for n in copy_chat_templates(src, dest) if n not in copied]  # named templates too
    return copied, AutoTokenizer.from_pretrained(str(dest))


def pass_through(base_dir: Path, heldout: dict[str, list[str]], output_dir: PathLike) -> Expansion:
    """Method none: the base's tokenizer files, copied unchanged and checked to give the base's ids."""
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(str(base_dir))
    texts = [t for rows in heldout.values() for t in rows] + list(PROBES)
    with atomic_path(output_dir) as tmp:
        copied, tok = _copy_tokenizer(base_dir, Path(tmp))
        if len(tok) != len(base_tok) or compression.encoder(tok)(texts) != compression.encoder(base_tok)(texts):
            raise ValueError(f"{base_dir}: the copied tokenizer files do not reproduce the base tokenizer")
    return {"base_vocab_size": len(base_tok), "vocab_size": len(base_tok), "added": 0, "files": copied}, base_tok, tok


def pinned(cfg: VocabConfig, base_dir: Path, heldout: dict[str, list[str]], output_dir: PathLike) -> Expansion:
    """vocab.tokenizer: the given tokenizer's files copied, checked to keep every base token's id."""
    from transformers import AutoTokenizer

    src = Path(cfg.tokenizer)
    base_tok = AutoTokenizer.from_pretrained(str(base_dir))
    with atomic_path(output_dir) as tmp:
        copied, tok = _copy_tokenizer(src, Path(tmp))
        have = tok.get_vocab()
        moved = sorted((i, t) for t, i in base_tok.get_vocab().items() if have.get(t) != i)
        if moved:
            raise ValueError(f"vocab.tokenizer {src}: {len(moved)} base token(s) are missing or have another id "
                             f"(first: {moved[0][1]!r}, id {moved[0][0]} in the base); it was not made from this base")
        same = [t for t in heldout.get("en", []) + list(PROBES) if not has_cjk(t)] if cfg.require_cjk else []
        if compression.encoder(tok)(same) != compression.encoder(base_tok)(same):
            raise ValueError(f"vocab.tokenizer {src}: English text encodes to other ids than with the base")
    return ({"base_vocab_size": len(base_tok), "vocab_size": len(tok), "added": len(tok) - len(base_tok),
             "files": copied, "pinned": str(src)}, base_tok, tok)


def run(
    cfg: VocabConfig, base_dir: PathLike, train_files: Sequence[PathLike], heldout_zh: PathLike | None,
    heldout_en: PathLike | None, output_dir: PathLike, stats_path: PathLike | None = None,
    report_json: PathLike | None = None, report_md: PathLike | None = None,
) -> Stats:
    """Expand (or pass through) the base tokenizer, verify, save; write the report and the manifest.

    The method must apply to the base's tokenizer kind (``cptflow.tokenizer.kind``). The held-out
    files (either may be None) feed the checks and the report: Chinese must round-trip, English
    must also keep its exact base ids (with ``require_cjk``).
    """
    stats = Stats()
    with Timer() as timer:
        base_dir = Path(base_dir)
        found = detect_kind(base_dir)
        if not cfg.tokenizer and cfg.method not in methods_for(found.kind):
            raise ValueError(f"{found.file}: vocab.method {cfg.method!r} cannot handle a {found.kind} tokenizer "
                             f"({found.detail}); methods that apply: {', '.join(methods_for(found.kind))}")
        heldout = {lang: list(iter_texts(p)) for lang, p in (("zh", heldout_zh), ("en", heldout_en)) if p}
        if cfg.tokenizer:
            info, base_tok, new_tok = pinned(cfg, base_dir, heldout, output_dir)
        elif cfg.method == "none":
            info, base_tok, new_tok = pass_through(base_dir, heldout, output_dir)
        elif cfg.method == "continued_bpe":
            info, base_tok, new_tok = bpe_expand.expand(cfg, base_dir, train_files, heldout, output_dir, stats)
        else:
            info, base_tok, new_tok = expand_sentencepiece(cfg, base_dir, train_files, heldout, output_dir, stats)
        report = compression.compare({"base": base_tok, "expanded": new_tok}, heldout)
        if "audit" in info:
            report["audit"] = info["audit"]
        if report_json:
            write_json(report_json, report)
        if report_md:
            with atomic_path(report_md) as tmp:
                Path(tmp).write_text(compression.markdown_table(report), encoding="utf-8")
    rows = report["tokenizers"]
    log.info("%s: vocab %d -> %d (+%d) in %.1f s", cfg.method, info["base_vocab_size"], info["vocab_size"],
             info["added"], timer.seconds)
    for lang in heldout:
        log.info("%s tokens/char %.4f -> %.4f", lang, rows["base"][lang]["tokens_per_char"],
                 rows["expanded"][lang]["tokens_per_char"])
    if stats_path:
        inputs = [Path(found.file)] + ([Path(cfg.tokenizer)] if cfg.tokenizer else [] if cfg.method == "none"
                                       else list(train_files))
        inputs += [p for p in (heldout_zh, heldout_en, cfg.user_words_file) if p]
        write_manifest(
            stats_path, stage="vocab", version=VERSION, params=to_dict(cfg), stats=stats, seconds=timer.seconds,
            inputs=inputs, outputs=[p for p in (output_dir, report_json, report_md) if p],
            extra={"vocab": {"method": "pinned" if cfg.tokenizer else cfg.method, "kind": found.kind, **info},
                   "compression": report},
        )
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-tokenizer", required=True,
                   help="base tokenizer or model folder (tokenizer.model and/or tokenizer.json)")
    p.add_argument("--train-text", nargs="*", default=[],
                   help=".jsonl[.gz/.zst] (field text) or .parquet (column); none with vocab.tokenizer")
    p.add_argument("--heldout-zh", default=None, help="JSONL with 'text': round-trip check + compression report")
    p.add_argument("--heldout-en", default=None, help="JSONL with 'text': must keep the base ids; report")
    p.add_argument("--output-dir", required=True, help="tokenizer folder to write (atomically)")
    p.add_argument("--stats", default=None, help="provenance manifest <output>.stats.json")
    p.add_argument("--report-json", default=None, help="compression report (JSON)")
    p.add_argument("--report-md", default=None, help="compression report (markdown table)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(VocabConfig, params, "vocab")
    # the base and each shard folder the training text comes from, against their producers' manifests
    verify_inputs([args.base_tokenizer, *dict.fromkeys(str(Path(f).parent) for f in args.train_text)])
    run(cfg, args.base_tokenizer, args.train_text, args.heldout_zh, args.heldout_en, args.output_dir,
        args.stats, args.report_json, args.report_md)


def main(argv: Sequence[str] | None = None) -> int:
    from cptflow.core.cli import stage_main

    return stage_main("vocab", argv, _build, _run, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
