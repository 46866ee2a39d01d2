"""The last data stage, one job per input file: its surviving documents as a parquet shard.

Everything that passed ingest, clean, dedup, decontamination and PII masking is written as
``data/shards/<source>/<part>.parquet`` (columns id, text, source, lang; the category in the file's
metadata and manifest), in line order, streamed ``batch_docs`` documents per row group, so a job's
memory is one batch whatever the file's size, and adding a file writes only its own shard. These
shards are the clean corpus a run delivers and what ``vocab`` and ``pack_shard`` read. The same
input gives byte-identical shards.

A file whose documents were all filtered gives an empty shard (0 rows), counted in its manifest;
a whole category left empty is an error of the funnel (and of ``pack`` for a category it trains
on), which says where each file's documents went (``cptflow.data.diagnose.why_empty``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from cptflow.core import cli
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import ZSTD_LEVEL, atomic_path, iter_jsonl
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest

VERSION = 2
log = logging.getLogger("cptflow.data.shards")

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("lang", pa.string())])


@dataclass(frozen=True)
class ShardsConfig:
    batch_docs: int = 10_000  # documents per parquet row group: bounds a job's memory (~30 MB of web text)
    compression: str = "zstd"  # parquet codec; zstd is a good size/speed trade-off

    def __post_init__(self) -> None:
        if self.batch_docs < 1:
            raise ValueError("shards.batch_docs must be >= 1")


def run(cfg: ShardsConfig, category: str, input_path: str, output: str, stats_path: str) -> Stats:
    stats = Stats()
    schema = SCHEMA.with_metadata({"cptflow.category": category})
    # zstd at level 3, as the JSONL between stages: 0.42 of the text here, against 0.63 at pyarrow's default 1
    level = {"compression_level": ZSTD_LEVEL} if cfg.compression == "zstd" else {}
    with Timer() as t, atomic_path(output) as tmp, \
            pq.ParquetWriter(tmp, schema, compression=cfg.compression, **level) as writer:
        batch: list[dict] = []
        for rec in iter_jsonl(input_path):
            if rec.get("category") != category:
                raise ValueError(f"{input_path}: document {rec.get('id')} has category {rec.get('category')!r}, "
                                 f"not {category!r}")
            batch.append({k: rec[k] for k in ("id", "text", "source", "lang")})
            stats.update("docs_in")
            stats.update("chars_in", len(rec["text"]))
            if len(batch) >= cfg.batch_docs:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch or not stats["docs_in"]:  # an empty file still gets one (empty) row group: a valid shard
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        stats.update("docs_out", stats["docs_in"])
        stats.update("chars_out", stats["chars_in"])
    if not stats["docs_out"]:
        log.warning("%s: no document of category %s left in this file (an empty shard)", input_path, category)
    log.info("%s: %d documents, %d characters (category %s)", output, stats["docs_out"], stats["chars_out"], category)
    write_manifest(stats_path, stage="shards", version=VERSION, params=to_dict(cfg) | {"category": category},
                   inputs=[input_path], stats=stats, seconds=t.seconds, outputs=[output])
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--category", required=True)
        p.add_argument("--input", required=True, help="documents (JSONL) of one input file")
        p.add_argument("--output", required=True, help="parquet shard")
        p.add_argument("--stats", required=True)

    def go(args, params):
        verify_inputs([args.input])
        run(from_dict(ShardsConfig, params, "shards"), args.category, args.input, args.output, args.stats)

    return cli.stage_main("shards", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
