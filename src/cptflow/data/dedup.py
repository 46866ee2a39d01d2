"""Dedup stage 4, one job per input file: remove the documents its drop list names.

Kept documents go on unchanged; removed ones go to the dropped file with the record plus
``"reason"`` (``dedup_exact`` / ``dedup_near``) and ``"kept"`` (the id of the document that stays),
so every removal can be checked by eye. A drop-list id that is not in the documents file means the
two files do not belong together (stale outputs, wrong wiring): that is an error naming both files.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from cptflow.core import cli
from cptflow.core.config import from_dict, to_dict
from cptflow.data.minhash import DedupConfig
from cptflow.data.signature import iter_documents
from cptflow.core.io import PathLike, atomic_path, dumps_record, iter_jsonl, open_text
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest

VERSION = 2
log = logging.getLogger("cptflow.data.dedup")
REASONS = ("dedup_exact", "dedup_near")


def read_drop_list(path: PathLike) -> dict[str, dict[str, str]]:
    """id → {"reason", "kept"}; malformed entries name the file and entry number."""
    drops: dict[str, dict[str, str]] = {}
    for n, rec in enumerate(iter_jsonl(path), 1):
        if not isinstance(rec.get("id"), str) or rec.get("reason") not in REASONS or not isinstance(rec.get("kept"), str):
            raise ValueError(f"{path}: entry {n} is not a drop-list record ({rec!r:.120})")
        if rec["id"] in drops:
            raise ValueError(f"{path}: entry {n}: id {rec['id']!r} listed twice")
        drops[rec["id"]] = {"reason": rec["reason"], "kept": rec["kept"]}
    return drops


def split_documents(docs: Iterator[dict[str, Any]], drops: dict[str, dict[str, str]]) -> Iterator[tuple[bool, dict[str, Any]]]:
    """(keep?, record) per document; removed records gain "reason" and "kept" (pure)."""
    for rec in docs:
        d = drops.get(rec["id"])
        yield (True, rec) if d is None else (False, {**rec, "reason": d["reason"], "kept": d["kept"]})


def run(cfg: DedupConfig, input_path: PathLike, drop_path: PathLike, output: PathLike, dropped_path: PathLike,
        stats_path: PathLike) -> Stats:
    stats = Stats()
    with Timer() as t:
        drops = read_drop_list(drop_path)
        seen: set[str] = set()
        with atomic_path(output) as tmp_out, atomic_path(dropped_path) as tmp_drop, \
                open_text(tmp_out, "w", like=output) as out, open_text(tmp_drop, "w", like=dropped_path) as dropped:
            docs = (rec for _, rec in iter_documents(input_path))
            for keep, rec in split_documents(docs, drops):
                n_chars = len(rec["text"])
                stats.update("docs_in")
                stats.update("chars_in", n_chars)
                if keep:
                    out.write(dumps_record(rec) + "\n")
                    stats.update("docs_out")
                    stats.update("chars_out", n_chars)
                else:
                    seen.add(rec["id"])
                    dropped.write(dumps_record(rec) + "\n")
                    stats.drop(rec["reason"], n_chars)
            missing = sorted(set(drops) - seen)
            if missing:
                raise ValueError(f"drop list {drop_path} names {len(missing)} id(s) not in {input_path} "
                                 f"(first: {missing[0]!r}); the two files do not belong together")
    log.info("%s: %d in, %d kept, %d removed as duplicates", input_path, stats["docs_in"], stats["docs_out"],
             stats["docs_in"] - stats["docs_out"])
    write_manifest(stats_path, stage="dedup", version=VERSION, params=to_dict(cfg), inputs=[input_path, drop_path],
                   stats=stats, seconds=t.seconds, outputs=[output, dropped_path])
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--input", required=True, help="documents (intermediate JSONL)")
        p.add_argument("--drop", required=True, help="this file's drop list from dedup.clusters")
        p.add_argument("--output", required=True, help="kept documents (JSONL)")
        p.add_argument("--dropped", required=True, help="removed documents with reason and kept id (JSONL)")
        p.add_argument("--stats", required=True)
        p.add_argument("--drop-manifest", default=None,
                       help="manifest of the clusters stage that wrote --drop (to check the drop list against)")

    def go(args, params):
        verify_inputs([args.input])
        verify_inputs([args.drop], [args.drop_manifest] if args.drop_manifest else [])
        run(from_dict(DedupConfig, params, "dedup"), args.input, args.drop, args.output, args.dropped, args.stats)

    return cli.stage_main("dedup", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
