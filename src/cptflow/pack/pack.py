"""Stage ``pack``, the cheap global step: lay the packed shards out as training samples, mixed into buckets.

Every input file was tokenized and spliced by its own ``pack_shard`` job; this step reads only their
small arrays (row lengths, metadata), never a token, and writes an index (``cptflow.pack.packed``):
which (shard, row) is the i-th sample, and its bucket and category. Memory and time grow with the
number of samples (tokens / max_length): the index's 14 bytes a sample plus 4 a packed row, and the
bucket plan's temporaries (bench/RESULTS.md, scale, has the measured figure).

Buckets (``cptflow.pack.buckets``): every category's rows (its shards in path order, then row order)
are cut into ``num_bins`` bins and bucket k is bin k of every category, shuffled together, so each
stretch of training sees the whole mixture; category weights repeat or subsample rows per bin, and
the replay category is a fixed share of every bucket. The index is byte-identical for equal inputs
and config (every shuffle seeded by ``seed``).

A category the mixture trains on (weight > 0, or the replay category with share > 0) that has no
rows is an error naming the category and where its documents went (``cptflow.data.diagnose``); an
empty shard (a file whose documents were all filtered) is counted and skipped.
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
from cptflow.core.io import PathLike, atomic_path, sha256_file, write_json
from cptflow.core.provenance import InputMismatch, find_record, upstream, verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.data.diagnose import why_empty
from cptflow.pack.buckets import bucket_order, plan_buckets, resolve_weights
from cptflow.pack.pack_config import PackConfig, ReplayConfig  # noqa: F401 (ReplayConfig: part of the stage API)
from cptflow.pack.packed import read_meta, write_index

VERSION = 2
log = logging.getLogger("cptflow.pack.pack")
SUMMED = ("docs", "doc_tokens", "stream_tokens", "docs_split", "rows_packed", "tail_tokens_dropped", "padding_tokens")


def read_shard(shard_dir: PathLike) -> tuple[dict[str, Any], np.ndarray, str]:
    """(meta, row lengths, sha256 of tokens.npy) of one packed shard, checked against its manifest.

    The small files are checked by sha256; ``tokens.npy``, which this step does not read, by size
    (free), its sha256 taken from the manifest into the index.
    """
    d = Path(shard_dir)
    manifest = [Path(f"{os.path.normpath(d)}.stats.json")]
    verify_inputs([d / "meta.json", d / "real.npy"], manifest)
    meta = read_meta(d)
    tokens = d / "tokens.npy"
    found = find_record(tokens, manifest)
    if found is None:
        log.warning("%s: no manifest lists this file; its sha256 is computed here", tokens)
        sha = sha256_file(tokens)
    else:
        mpath, m, key = found
        want = (m.get("output_bytes") or {}).get(key)
        if want is not None and tokens.stat().st_size != want:
            raise InputMismatch(f"{tokens}: {tokens.stat().st_size} bytes, but {mpath} recorded {want}; it changed "
                                "after pack_shard wrote it: delete it and rerun the workflow")
        sha = m["outputs"][key]
    real = np.load(d / "real.npy")
    if len(real) != meta["rows"]:
        raise ValueError(f"{d}: real.npy has {len(real)} rows, meta.json says {meta['rows']}")
    return meta, real, sha


def trained(weights: dict[str, float], cfg: PackConfig) -> list[str]:
    """Categories the mixture takes samples from."""
    out = [c for c, w in weights.items() if w > 0]
    return out + ([cfg.replay.category] if cfg.replay is not None and cfg.replay.share > 0 else [])


def run(cfg: PackConfig, shard_dirs: Sequence[PathLike], output_dir: PathLike, counts_path: PathLike,
        stats_path: PathLike | None = None) -> Stats:
    """Index the packed shards into the training samples (``output_dir``) and write the counts JSON."""
    stats = Stats()
    with Timer() as timer:
        shards = sorted((read_shard(d) + (str(d),) for d in shard_dirs), key=lambda s: (s[0]["category"], s[3]))
        for meta, _, _, d in shards:
            if meta["max_length"] != cfg.max_length:
                raise ValueError(f"{d}: rows of {meta['max_length']} tokens, but pack.max_length is {cfg.max_length}")
        for key in ("dtype", "tokenizer_sha256"):
            if len({s[0][key] for s in shards}) > 1:
                raise ValueError(f"packed shards differ in {key} ({sorted({s[0][key] for s in shards})}): they were "
                                 "made with different tokenizers; rerun pack_shard")
        names = sorted({s[0]["category"] for s in shards})
        weights = resolve_weights(names, cfg)
        rows = {c: sum(int(s[0]["rows"]) for s in shards if s[0]["category"] == c) for c in names}
        for c in trained(weights, cfg):
            if not rows[c]:
                files = [s[0]["shard"] for s in shards if s[0]["category"] == c]
                raise ValueError(why_empty(c, upstream(files)) + "\n(pack: nothing of this category to train on)")
        real_of = {c: np.concatenate([s[1] for s in shards if s[0]["category"] == c] or [np.zeros(0, np.int32)])
                   for c in names}  # each category's row lengths in its shards' order, held once from here on
        shards = [(m, None, sha, d) for m, _, sha, d in shards]
        used = [s for s in shards if s[0]["rows"]]  # empty shards hold no sample
        cats, sample_row, buckets = bucket_order(plan_buckets(rows, weights, cfg), names, cfg.seed)
        sample_shard, tallies = locate(used, real_of, names, cats, sample_row, buckets, cfg.num_bins)
        counts = _counts(shards, names, cats, tallies, weights, cfg)
        out = Path(output_dir)
        # Paths relative to the index (atomic_path's temporary is its sibling): the run folder can move.
        refs = [{"path": os.path.relpath(os.path.abspath(d), os.path.abspath(out)), "rows": int(m["rows"]),
                 "category": m["category"],
                 "tokens_bytes": (Path(d) / "tokens.npy").stat().st_size, "tokens_sha256": sha}
                for m, _, sha, d in used]
        with atomic_path(out) as tmp:
            write_index(tmp, refs, names, cfg.max_length, shards[0][0]["dtype"] if shards else "uint32",
                        sample_shard, sample_row, buckets, cats,
                        {"tokenizer_sha256": shards[0][0]["tokenizer_sha256"] if shards else None})
        write_json(counts_path, counts)
        for key in ("samples", "tokens", "padding_tokens"):
            stats.update(key, counts["total"][key])
        stats.update("shards", len(shards))
        stats.update("shards_empty", len(shards) - len(used))
    log.info("%d samples, %d tokens in %d buckets from %d shards (%d empty) (%.1f s)", len(cats),
             counts["total"]["tokens"], cfg.num_bins, len(shards), len(shards) - len(used), timer.seconds)
    if stats_path:
        inputs = [Path(d) / f for *_, d in shards for f in ("meta.json", "real.npy")]
        write_manifest(stats_path, stage="pack", version=VERSION, params=to_dict(cfg), inputs=inputs, stats=stats,
                       seconds=timer.seconds, outputs=[output_dir, counts_path])
    return stats


CHUNK = 1 << 20  # samples per step of ``locate``: its temporaries stay about 50 MB at any size


def locate(used: list[tuple], real_of: dict[str, np.ndarray], names: list[str], cats: np.ndarray, rows: np.ndarray,
           buckets: np.ndarray, num_bins: int) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Turn each sample's row within its category into (shard, row within shard), in place, a chunk at a time.

    ``rows`` (a category's rows in its shards' path order) is overwritten with the row within the shard,
    so the layout holds 14 bytes a sample (category 2, row 4, bucket 4, shard 4) plus 4 a packed row (the
    real lengths), whatever the size. Returns the shard array and, per category, samples and real tokens
    per bucket, tallied on the way (float64 sums are exact below 2^53 tokens).
    """
    shard = np.zeros(len(cats), np.uint32)
    table = []
    for c in names:
        mine = [i for i, s in enumerate(used) if s[0]["category"] == c]
        table.append((np.asarray(mine, np.uint32), np.cumsum([0, *(used[i][0]["rows"] for i in mine)]), real_of[c]))
    tallies = {c: (np.zeros(num_bins, np.int64), np.zeros(num_bins, np.float64)) for c in names}
    for at in range(0, len(cats), CHUNK):
        part_c, part_r, part_b, part_s = (a[at:at + CHUNK] for a in (cats, rows, buckets, shard))  # views
        for ci, (mine, offsets, real) in enumerate(table):
            sel = np.flatnonzero(part_c == ci)
            if not len(sel):
                continue
            r, b = part_r[sel], part_b[sel]
            n_k, t_k = tallies[names[ci]]
            n_k += np.bincount(b, minlength=num_bins)
            t_k += np.bincount(b, weights=real[r], minlength=num_bins)
            k = np.searchsorted(offsets, r, side="right") - 1
            part_s[sel] = mine[k]
            part_r[sel] = r - offsets[k]
    return shard, tallies


def _counts(shards: list[tuple], names: list[str], cats: np.ndarray,
            tallies: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float],
            cfg: PackConfig) -> dict[str, Any]:
    """Samples and tokens per category per bucket, plus how each category was packed (summed over its shards)."""
    per_cat: dict[str, Any] = {}
    for name in names:
        n_k, t_k = tallies[name]
        mine = [s[0]["counts"] for s in shards if s[0]["category"] == name]
        packed = {k: int(sum(c[k] for c in mine)) for k in SUMMED}
        per_bucket = [{"samples": int(n_k[k]), "tokens": int(t_k[k])} for k in range(cfg.num_bins)]
        per_cat[name] = {**packed, "shards": len(mine), "weight": weights.get(name, "replay"),
                         "samples": int(n_k.sum()), "tokens": int(t_k.sum()), "buckets": per_bucket}
    tokens = int(sum(c["tokens"] for c in per_cat.values()))
    total = {"samples": len(cats), "tokens": tokens, "padding_tokens": len(cats) * cfg.max_length - tokens}
    out: dict[str, Any] = {"max_length": cfg.max_length, "tail": cfg.tail, "num_bins": cfg.num_bins,
                           "seed": cfg.seed, "categories": per_cat, "total": total,
                           "buckets": [{"samples": sum(c["buckets"][k]["samples"] for c in per_cat.values()),
                                        "tokens": sum(c["buckets"][k]["tokens"] for c in per_cat.values())}
                                       for k in range(cfg.num_bins)]}
    if cfg.replay is not None:
        n = per_cat[cfg.replay.category]["samples"]
        out["replay"] = {"category": cfg.replay.category, "share_target": cfg.replay.share,
                         "share_actual": n / len(cats) if len(cats) else 0.0}
    return out


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, nargs="+", help="packed shard directories (pack_shard outputs)")
    p.add_argument("--output-dir", required=True, help="training data: the index over the shards")
    p.add_argument("--counts", required=True, help="JSON of samples/tokens per category per bucket")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    run(from_dict(PackConfig, params, "pack"), args.shards, args.output_dir, args.counts, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("pack", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
