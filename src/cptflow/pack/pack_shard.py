"""Stage ``pack_shard``, one job per input file: tokenize its data shard and splice it into rows.

Reads the file's parquet shard (``data/shards/<source>/<part>.parquet``) ``batch_docs`` documents at a
time, tokenizes them with the run's tokenizer (Rust ``encode_batch_fast``) and streams BOS + ids +
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

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path, sha256_path
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.model.hf import load_tokenizer, raw_text_encoder
from cptflow.pack.pack_config import PackConfig
from cptflow.pack.packed import SHARD_FILES, token_dtype
from cptflow.pack.splice import ShardWriter, read_batches, tokenize

VERSION = 1
log = logging.getLogger("cptflow.pack.pack_shard")


def special_ids(tok: Any, cfg: PackConfig, where: PathLike) -> tuple[int | None, int | None, int]:
    """(BOS or None, EOS or None, pad id) as the config asks; a missing one is an error naming the tokenizer."""
    bos = tok.bos_token_id if cfg.add_bos else None
    eos = tok.eos_token_id if cfg.add_eos else None
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else tok.eos_token_id
    if (cfg.add_bos and bos is None) or (cfg.add_eos and eos is None) or pad_id is None:
        raise ValueError(f"{where}: tokenizer lacks the BOS/EOS/pad id this config needs")
    return bos, eos, int(pad_id)


def max_token_id(tok: Any) -> int:
    """The largest id the tokenizer can produce (vocabulary and added tokens)."""
    return max(len(tok) - 1, *tok.get_vocab().values())


def run(cfg: PackConfig, tokenizer_dir: PathLike, shard: PathLike, category: str, output_dir: PathLike,
        stats_path: PathLike | None = None) -> Stats:
    """Pack one parquet shard of ``category`` into the shard directory ``output_dir``."""
    if cfg.num_threads:  # only effective before the tokenizers thread pool first starts in this process
        os.environ["RAYON_NUM_THREADS"] = str(cfg.num_threads)
    stats = Stats()
    with Timer() as timer:
        tok = load_tokenizer(tokenizer_dir)
        bos, eos, pad_id = special_ids(tok, cfg, tokenizer_dir)
        dtype = token_dtype(max(max_token_id(tok), pad_id))
        backend = raw_text_encoder(tok)
        with atomic_path(output_dir) as tmp:
            writer = ShardWriter(tmp, cfg.max_length, dtype, pad_id, cfg.tail, bos, eos)
            for texts in read_batches(shard, cfg.batch_docs):
                docs = tokenize(tok, texts, cfg.batch_docs, backend)
                kept = [d for d in docs if len(d)]
                for t, d in zip(texts, docs):
                    if not len(d):
                        stats.drop("pack_empty", len(t))
                stats.update("docs_in", len(texts))
                stats.update("chars_in", sum(map(len, texts)))
                writer.add(kept)
            counts = writer.finish({"category": category, "shard": str(shard),
                                    "tokenizer_sha256": sha256_path(tokenizer_dir)})
        stats.update("docs_out", counts["docs"])
        for key in ("doc_tokens", "rows_packed", "padding_tokens", "tail_tokens_dropped", "docs_split"):
            stats.update(key, counts[key])
    log.info("%s (%s): %d docs -> %d rows of %d (%s ids, %.1f s)", shard, category, counts["docs"],
             counts["rows_packed"], cfg.max_length, dtype.name, timer.seconds)
    if stats_path:
        write_manifest(stats_path, stage="pack_shard", version=VERSION, params=to_dict(cfg) | {"category": category},
                       inputs=[tokenizer_dir, shard], stats=stats, seconds=timer.seconds,
                       outputs=[Path(output_dir) / f for f in SHARD_FILES])
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (the run's expanded or pinned one)")
    p.add_argument("--input", required=True, help="the file's data shard (parquet with a 'text' column)")
    p.add_argument("--category", required=True, help="the category the file belongs to")
    p.add_argument("--output-dir", required=True, help="packed shard directory")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")
    p.add_argument("--threads", type=int, default=None, help="overrides pack.num_threads (the rule's threads)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    if args.threads is not None:
        params = {**params, "num_threads": args.threads}
    cfg = from_dict(PackConfig, params, "pack")
    verify_inputs([args.tokenizer, args.input])
    run(cfg, args.tokenizer, args.input, args.category, args.output_dir, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("pack_shard", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
