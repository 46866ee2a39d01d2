"""Writing the surviving documents of one category as parquet shards.

The last data stage: everything that passed ingest, clean, dedup, decontamination and PII masking is
gathered per category (the unit the pack stage mixes with weights) and written as parquet shards of
at most ``max_docs_per_shard`` documents, in input-file order then line order, so the same inputs
give byte-identical shards. Stats per category feed the funnel.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from cptflow import cli
from cptflow.config import from_dict, to_dict
from cptflow.io import atomic_path, iter_jsonl
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
log = logging.getLogger("cptflow.shards")

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("lang", pa.string())])


@dataclass(frozen=True)
class ShardsConfig:
    max_docs_per_shard: int = 50_000  # keeps a shard a few hundred MB at most for web text
    compression: str = "zstd"  # parquet codec; zstd is a good size/speed trade-off

    def __post_init__(self) -> None:
        if self.max_docs_per_shard < 1:
            raise ValueError("shards.max_docs_per_shard must be >= 1")


def run(cfg: ShardsConfig, category: str, inputs: Sequence[str], output_dir: str, stats_path: str) -> Stats:
    stats = Stats()
    with Timer() as t, atomic_path(output_dir) as tmp:
        tmp.mkdir(parents=True)
        batch: list[dict] = []
        n_shards = 0

        def flush() -> None:
            nonlocal batch, n_shards
            table = pa.Table.from_pylist(batch, schema=SCHEMA)
            pq.write_table(table, tmp / f"part-{n_shards:05d}.parquet", compression=cfg.compression)
            n_shards += 1
            batch = []

        for path in inputs:
            for rec in iter_jsonl(path):
                if rec.get("category") != category:
                    raise ValueError(f"{path}: document {rec.get('id')} has category {rec.get('category')!r}, not {category!r}")
                batch.append({k: rec[k] for k in ("id", "text", "source", "lang")})
                stats.update("docs_in")
                stats.update("chars_in", len(rec["text"]))
                if len(batch) >= cfg.max_docs_per_shard:
                    flush()
        if batch or n_shards == 0:
            flush()
        stats.update("docs_out", stats["docs_in"])
        stats.update("chars_out", stats["chars_in"])
        stats.update("shards", n_shards)
    log.info("category %s: %d documents, %d characters in %d shard(s)", category, stats["docs_out"], stats["chars_out"], n_shards)
    write_manifest(stats_path, stage="shards", version=VERSION, params=to_dict(cfg) | {"category": category},
                   inputs=inputs, stats=stats, seconds=t.seconds, outputs=[output_dir])
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--category", required=True)
        p.add_argument("--inputs", nargs="+", required=True, help="documents (JSONL) of this category, in order")
        p.add_argument("--output-dir", required=True)
        p.add_argument("--stats", required=True)

    def go(args, params):
        run(from_dict(ShardsConfig, params, "shards"), args.category, args.inputs, args.output_dir, args.stats)

    return cli.stage_main("shards", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
