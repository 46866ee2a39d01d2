"""Clean stage: normalise every document, then drop the ones that fail a rule filter.

Input and output are intermediate-format JSONL (``{"id", "text", "source", "category", "lang"}``,
as ``cptflow.data.ingest`` writes it). Kept documents carry the normalised text; dropped documents go to
a separate JSONL with their text *as it came in* plus ``"reason"``, so a person auditing the drops
sees what the source really held. Normalisation lives in ``cptflow.data.normalise``, the checks in
``cptflow.data.filters``; this module holds the config, the per-document function and the file I/O.

The default thresholds were measured on the demo corpus (workflow/resources/demo/corpus): they keep
the classical poems (complete works go down to 10 characters), the zh_web tutorials with
their code blocks, and the English prose, and they drop the Project Gutenberg licence boilerplate
and the lacuna-ridden records of the upstream ``error`` files. ``tests/test_clean.py`` pins the
per-file drop counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.data.clean_config import CleanConfig
from cptflow.data.filters import filter_reason
from cptflow.core.io import PathLike, atomic_path, dumps_record, iter_jsonl, open_text
from cptflow.core.provenance import verify_inputs
from cptflow.data.normalise import is_zh, normalise_counted
from cptflow.core.stats import Stats, Timer, write_manifest

# 2: mean word length filter (clean_mean_word_length)
VERSION = 3
log = logging.getLogger("cptflow.data.clean")

def normalise_text(text: str, lang: str, cfg: CleanConfig) -> str:
    """The normalised text (see ``cptflow.data.normalise`` for the steps and why)."""
    return normalise_counted(text, lang, cfg)


def clean_document(
    text: str, lang: str, cfg: CleanConfig, counts: dict[str, int] | None = None
) -> tuple[str, str | None]:
    """Normalise ``text`` and run the filters on the result: (normalised text, drop reason or None)."""
    out = normalise_counted(text, lang, cfg, counts)
    return out, filter_reason(out, is_zh(lang), cfg)


def run(cfg: CleanConfig, input_path: PathLike, output: PathLike, dropped: PathLike) -> Stats:
    """Clean one intermediate JSONL file; write kept and dropped documents (atomically)."""
    stats = Stats()
    counts: dict[str, int] = {}
    with atomic_path(output) as tmp_out, atomic_path(dropped) as tmp_drop:
        with open_text(tmp_out, "w", like=output) as fo, open_text(tmp_drop, "w", like=dropped) as fd:
            for lineno, rec in enumerate(iter_jsonl(input_path), 1):
                text, lang = rec.get("text"), rec.get("lang")
                if not isinstance(text, str) or not isinstance(lang, str):
                    raise ValueError(f"{input_path}:{lineno}: record needs string 'text' and 'lang' (ingest output)")
                stats.update("docs_in")
                stats.update("chars_in", len(text))
                new, reason = clean_document(text, lang, cfg, counts)
                if reason is None:
                    out = dict(rec)
                    out["text"] = new
                    fo.write(dumps_record(out) + "\n")
                    stats.update("docs_out")
                    stats.update("chars_out", len(new))
                else:
                    fd.write(dumps_record({**rec, "reason": reason}) + "\n")
                    stats.drop(reason, len(text))
    for k in sorted(counts):
        stats.update(k, counts[k])
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="intermediate JSONL (from ingest)")
    p.add_argument("--output", required=True, help="kept documents, normalised (JSONL)")
    p.add_argument("--dropped", required=True, help="dropped documents as they came in, plus 'reason' (JSONL)")
    p.add_argument("--stats", required=True, help="provenance manifest (JSON)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(CleanConfig, params, "clean")
    verify_inputs([args.input])
    with Timer() as t:
        stats = run(cfg, args.input, args.output, args.dropped)
    files = [*cfg.blocklist_word_files, *cfg.blocklist_pattern_files]
    write_manifest(
        args.stats, stage="clean", version=VERSION, params=to_dict(cfg), inputs=[args.input, *files],
        stats=stats, seconds=t.seconds, outputs=[args.output, args.dropped],
    )
    dropped = stats.under("dropped")
    log.info("%s: %d in, %d kept, dropped %s", args.input, stats["docs_in"], stats["docs_out"], dropped)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("clean", argv, _build, _run, "Normalise documents and drop those failing rule filters.")


if __name__ == "__main__":
    sys.exit(main())
