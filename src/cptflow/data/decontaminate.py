"""Stage ``decontaminate``: drop training documents that contain an evaluation question, so scores stay honest.

The index of the benchmarks is built once by ``decontaminate_index`` and read by this stage's job of
every input file; the matching rules (and why the n-gram lengths are what they are) are in
``cptflow.data.contamination``. Usage::

    python -m cptflow.data.decontaminate --input DOCS.jsonl --index INDEX.npz --output KEPT.jsonl \\
        --dropped DROPPED.jsonl --stats S.json --params '<json>'

A dropped document goes to ``--dropped`` with ``reason`` and ``match`` (benchmark, subject, split,
question id), so a person can see which question it contained.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any


from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.data.contamination import SEED, DecontaminateConfig, find_match, prepare_lookup
from cptflow.data.minhash import (
    multipliers,
)
from cptflow.data.npzio import read_npz
from cptflow.data.signature import iter_documents
from cptflow.core.io import PathLike, atomic_path, dumps_record, open_text
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest

VERSION = 2
log = logging.getLogger("cptflow.data.decontaminate")
REASON = "decontaminate_ngram"


def run_apply(cfg: DecontaminateConfig, input_path: PathLike, index_path: PathLike, output: PathLike,
              dropped_path: PathLike, stats_path: PathLike) -> Stats:
    stats = Stats()
    index = read_npz(index_path, ["benchmark", "subject", "split", "qid", "params", *(
        f"{k}_{a}" for k in ("char", "word") for a in ("keys", "rows", "lengths"))])
    want = json.dumps(cfg.match_params(), sort_keys=True)
    if str(index["params"]) != want:
        raise ValueError(f"{index_path}: index was built with {index['params']}, the config says {want}; rebuild it")
    mult = multipliers(SEED, max(cfg.ngram_chars, cfg.ngram_words))
    lookup = prepare_lookup(index)
    listed: list[dict[str, str]] = []
    per_benchmark: Counter[str] = Counter()
    with Timer() as t:
        with atomic_path(output) as tmp_out, atomic_path(dropped_path) as tmp_drop, \
                open_text(tmp_out, "w", like=output) as out, open_text(tmp_drop, "w", like=dropped_path) as dropped:
            for _, rec in iter_documents(input_path):
                n_chars = len(rec["text"])
                stats.update("docs_in")
                stats.update("chars_in", n_chars)
                row = find_match(rec["text"], lookup, mult)
                if row is None:
                    out.write(dumps_record(rec) + "\n")
                    stats.update("docs_out")
                    stats.update("chars_out", n_chars)
                    continue
                match = {k: str(index[k][row]) for k in ("benchmark", "subject", "split", "qid")}
                dropped.write(dumps_record({**rec, "reason": REASON, "match": match}) + "\n")
                stats.drop(REASON, n_chars)
                per_benchmark[match["benchmark"]] += 1
                listed.append({"id": rec["id"], **match})
    for b, n in per_benchmark.items():
        stats.update(f"matched/{b}", n)
    log.info("%s: %d in, %d dropped as contaminated", input_path, stats["docs_in"], len(listed))
    write_manifest(stats_path, stage="decontaminate", version=VERSION, params=to_dict(cfg),
                   inputs=[input_path, index_path], stats=stats, seconds=t.seconds, outputs=[output, dropped_path],
                   extra={"dropped": listed})
    return stats


def _build(p) -> None:
    p.add_argument("--input", required=True, help="documents (intermediate JSONL)")
    p.add_argument("--index", required=True, help="index from the decontaminate_index stage")
    p.add_argument("--output", required=True, help="kept documents (JSONL)")
    p.add_argument("--dropped", required=True, help="contaminated documents with reason and match (JSONL)")
    p.add_argument("--stats", required=True)


def _run(args, params: dict[str, Any]) -> None:
    cfg = from_dict(DecontaminateConfig, params, "decontaminate")
    verify_inputs([args.input, args.index])
    run_apply(cfg, args.input, args.index, args.output, args.dropped, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("decontaminate", argv, _build, _run, "Drop documents that contain a benchmark question.")


if __name__ == "__main__":
    sys.exit(main())
