"""Stage ``pack_shard``, one job per input file: tokenize its data shard and splice it into rows.

Reads the file's parquet shard (``data/shards/<source>/<part>.parquet``) ``batch_docs`` documents at a
time, tokenizes them with the run's encoder (``cptflow.pack.encoder``: the tokenizer's Rust backend, opened
without transformers, ``encode_batch_fast``) and streams BOS + ids +
EOS into rows of ``max_length`` tokens (``cptflow.pack.splice``), so a job's memory is bounded by a
batch, not by its shard, and the jobs spread over a cluster like the data stages. Output: a packed
shard directory (``cptflow.pack.packed``: 2-byte ids when the vocabulary fits, document starts,
row lengths) that the global ``pack`` step indexes into buckets without copying it. Adding an
input file packs only that file; the others' shards stay as they are.

A document that tokenizes to nothing is counted (``pack_empty``) and skipped; an empty shard gives
a shard of 0 rows, counted; the output is byte-identical for equal inputs and config, whatever
``num_threads``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.pack.encoder import load_encoder
from cptflow.pack.pack_config import PackConfig
from cptflow.pack.packed import SHARD_FILES
from cptflow.pack.splice import ShardWriter, encoded_batches

VERSION = 2
log = logging.getLogger("cptflow.pack.pack_shard")


def run(cfg: PackConfig, encoder_dir: PathLike, shard: PathLike, category: str, output_dir: PathLike,
        stats_path: PathLike | None = None) -> Stats:
    """Pack one parquet shard of ``category`` into ``output_dir`` with the run's encoder (``pack_encoder``)."""
    if cfg.num_threads:  # only effective before the tokenizers thread pool first starts in this process
        os.environ["RAYON_NUM_THREADS"] = str(cfg.num_threads)
    stats = Stats()
    with Timer() as timer:
        backend, enc = load_encoder(encoder_dir, cfg)
        dtype = np.dtype(enc["dtype"])
        with atomic_path(output_dir) as tmp:
            writer = ShardWriter(tmp, cfg.max_length, dtype, enc["pad"], cfg.tail, enc["bos"], enc["eos"])
            for texts, docs in encoded_batches(backend, shard, cfg.batch_docs):
                kept = [d for d in docs if len(d)]
                for t, d in zip(texts, docs):
                    if not len(d):
                        stats.drop("pack_empty", len(t))
                stats.update("docs_in", len(texts))
                stats.update("chars_in", sum(map(len, texts)))
                writer.add(kept)
            counts = writer.finish({"category": category, "shard": str(shard),
                                    "tokenizer_sha256": enc["tokenizer_sha256"]})
        stats.update("docs_out", counts["docs"])
        for key in ("doc_tokens", "rows_packed", "padding_tokens", "tail_tokens_dropped", "docs_split"):
            stats.update(key, counts[key])
    log.info("%s (%s): %d docs -> %d rows of %d (%s ids, %.1f s)", shard, category, counts["docs"],
             counts["rows_packed"], cfg.max_length, dtype.name, timer.seconds)
    if stats_path:
        write_manifest(stats_path, stage="pack_shard", version=VERSION, params=to_dict(cfg) | {"category": category},
                       inputs=[encoder_dir, shard], stats=stats, seconds=timer.seconds,
                       outputs=[Path(output_dir) / f for f in SHARD_FILES])
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="the run's encoder directory (pack_encoder's output)")
    p.add_argument("--input", required=True, help="the file's data shard (parquet with a 'text' column)")
    p.add_argument("--category", required=True, help="the category the file belongs to")
    p.add_argument("--output-dir", required=True, help="packed shard directory")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")
    p.add_argument("--threads", type=int, default=None, help="overrides pack.num_threads (the rule's threads)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    if args.threads is not None:
        params = {**params, "num_threads": args.threads}
    cfg = from_dict(PackConfig, params, "pack")
    verify_inputs([args.encoder, args.input])
    run(cfg, args.encoder, args.input, args.category, args.output_dir, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("pack_shard", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
