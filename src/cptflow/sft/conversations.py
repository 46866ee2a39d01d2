"""Stage ``conversations``: one conversation file in, its trainable conversations out, nothing lost silently.

Like ``ingest`` for the pre-training text: every line that is not a good conversation (see
``cptflow.sft.formats`` for the formats and the reasons) goes to the quarantine file with file,
line, reason, a detail naming the turn and an excerpt, and is counted under ``dropped/<reason>``;
the run goes on. Good conversations are then decontaminated against the benchmarks exactly like the
pre-training documents: the ``decontaminate_index`` stage's n-gram index, the same matcher
(``cptflow.data.contamination.find_match``) over all of a conversation's text; a match is written
to the dropped file with the benchmark question it contains. Blank lines are skipped and counted,
so ``docs_in == docs_out + sum(dropped/*)``.

Output records: ``{"id": "<source>/<part>:<line>", "source": ..., "messages": [{"role", "content"}]}``.
The manifest's counts (``docs_in``/``docs_out``/``dropped/<reason>``) are in the data funnel, beside the
pre-training text's stages.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path, dumps_record
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.data.contamination import SEED, find_match, prepare_lookup
from cptflow.data.minhash import multipliers
from cptflow.data.npzio import read_npz
from cptflow.sft.config import FORMATS, ConversationsConfig
from cptflow.sft.formats import BadConversation, parse_line, plain_text

VERSION = 1
log = logging.getLogger("cptflow.sft.conversations")
CONTAMINATED = "sft_decontaminate_ngram"
BAD_RECORD = "sft_bad_record"  # a line that raised anything but BadConversation (the exception is the detail)
INDEX_KEYS = ["benchmark", "subject", "split", "qid", "params",
              *(f"{kind}_{a}" for kind in ("char", "word") for a in ("keys", "rows", "lengths"))]


class Matcher:
    """The benchmark n-gram index of ``decontaminate_index``, with the settings it was built with."""

    def __init__(self, index_path: PathLike):
        self.index = read_npz(index_path, INDEX_KEYS)
        built = json.loads(str(self.index["params"]))  # the index carries its own n-gram lengths
        self.mult = multipliers(SEED, max(built["ngram_chars"], built["ngram_words"]))
        self.lookup = prepare_lookup(self.index)

    def match(self, text: str) -> dict[str, str] | None:
        row = find_match(text, self.lookup, self.mult)
        return None if row is None else {k: str(self.index[k][row]) for k in ("benchmark", "subject", "split", "qid")}


def raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a .jsonl / .jsonl.gz file; a broken gzip is an error for the whole file."""
    if not path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        raise ValueError(f"{path}: conversations must be JSON Lines (.jsonl or .jsonl.gz)")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({e})") from e


def run(cfg: ConversationsConfig, input_path: PathLike, output: PathLike, quarantine: PathLike, dropped: PathLike,
        *, source: str, part: str, fmt: str = "auto", index: PathLike | None = None) -> Stats:
    """Validate and decontaminate one file; all three outputs are written atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if cfg.decontaminate and not index:
        raise ValueError("sft.conversations.decontaminate is on but no --index was given")
    matcher = Matcher(index) if cfg.decontaminate else None
    stats = Stats()
    first_bad = None
    with atomic_path(output) as t_out, atomic_path(quarantine) as t_q, atomic_path(dropped) as t_d, \
            open(t_out, "w", encoding="utf-8") as fo, open(t_q, "w", encoding="utf-8") as fq, \
            open(t_d, "w", encoding="utf-8") as fd:
        for line, raw in raw_lines(Path(input_path)):
            if not raw.strip():
                stats.update("skipped/sft_empty_line")
                continue
            stats.update("docs_in")
            try:
                messages = parse_line(raw, fmt)
            except Exception as e:  # noqa: BLE001 - one line never stops the file (as ingest): quarantined
                reason, detail = (e.reason, str(e)) if isinstance(e, BadConversation) else \
                    (BAD_RECORD, f"{type(e).__name__}: {e}"[:500])
                text = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
                stats.drop(reason, len(text))
                fq.write(dumps_record({"file": str(input_path), "line": line, "reason": reason, "detail": detail,
                                       "excerpt": text[: cfg.max_excerpt_chars]}) + "\n")
                first_bad = first_bad or f"line {line}: {reason} ({detail})"
                continue
            rec = {"id": f"{source}/{part}:{line}", "source": source, "messages": messages}
            chars = sum(len(m["content"]) for m in messages)
            hit = matcher.match(plain_text(messages)) if matcher else None
            if hit is not None:
                stats.drop(CONTAMINATED, chars)
                stats.update(f"matched/{hit['benchmark']}")
                fd.write(dumps_record({**rec, "reason": CONTAMINATED, "match": hit}) + "\n")
                continue
            fo.write(dumps_record(rec) + "\n")
            stats.update("docs_out")
            stats.update("chars_out", chars)
            stats.update("turns_out", sum(m["role"] == "assistant" for m in messages))
        n_in, n_out = stats["docs_in"], stats["docs_out"]
        n_bad = n_in - n_out - stats[f"dropped/{CONTAMINATED}"]
        if n_in and n_bad / n_in > cfg.max_bad_fraction:
            raise ValueError(f"{input_path}: {n_bad} of {n_in} lines are bad, more than max_bad_fraction "
                             f"{cfg.max_bad_fraction} (first: {first_bad})")
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="conversation file (.jsonl / .jsonl.gz)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="firefly | sharegpt | messages | auto")
    p.add_argument("--source", required=True, help="source name from sft.sources")
    p.add_argument("--part", required=True, help="part name used in ids (the file name without extensions)")
    p.add_argument("--index", default=None, help="decontamination index (decontaminate_index stage)")
    p.add_argument("--output", required=True, help="good conversations (JSONL)")
    p.add_argument("--quarantine", required=True, help="bad lines: file, line, reason, detail, excerpt (JSONL)")
    p.add_argument("--dropped", required=True, help="contaminated conversations with the question matched (JSONL)")
    p.add_argument("--stats", required=True, help="provenance manifest (JSON)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(ConversationsConfig, params, "sft.conversations")
    if args.index:
        verify_inputs([args.index])  # against decontaminate_index's manifest (index.npz -> index.stats.json)
    with Timer() as t:
        stats = run(cfg, args.input, args.output, args.quarantine, args.dropped, source=args.source, part=args.part,
                    fmt=args.format, index=args.index)
    write_manifest(args.stats, stage="conversations", version=VERSION, params=to_dict(cfg),
                   inputs=[args.input] + ([args.index] if args.index else []), stats=stats, seconds=t.seconds,
                   outputs=[args.output, args.quarantine, args.dropped],
                   extra={"source": args.source, "part": args.part, "format": args.format})
    bad = stats.under("dropped")
    log.info("%s: %d conversations, %d kept, dropped %s", args.input, stats["docs_in"], stats["docs_out"], bad)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("conversations", argv, _build, _run, "Validate and decontaminate one conversation file.")


if __name__ == "__main__":
    sys.exit(main())
