"""Tokenize the shards, splice documents into fixed-length samples, mix categories into buckets.

Splicing. Each category's documents (file order, then row order) become BOS + ids + EOS (both
configurable) and are concatenated greedily into rows of ``max_length`` tokens, so no token is
wasted on padding except in a category's last row. ``position_ids`` restart at 0 at every document
start, so training can keep attention within documents (a new segment begins wherever
position_ids == 0). A document longer than the room left is split and continues in the next row;
its continuation also restarts at 0: with RoPE only position differences matter, and attention
never crosses a row, so restarting changes nothing the model can see while keeping every position
below ``max_length``. ``labels`` equal ``input_ids`` (the model shifts them internally, predicting
token t+1 at t) and are -100 on padding. The last partial row of a category is dropped or padded
(``tail``), and counted either way; padding uses ``pad_token_id`` (default: EOS) and forms its own
segment (positions from 0) so no real token sees it.

Buckets. Every category's rows are shuffled (seeded) and cut into ``num_bins`` bins; bucket k is bin
k of every category, shuffled together, and the dataset is bucket 0, then bucket 1, ... — so each
stretch of training sees the same mixture instead of one category after another. Category weights
are applied per bin: a bin of m rows contributes round(w * m) rows, i.e. every row floor(w) times
plus a seeded subset for the fraction (2.0 = each row twice, 0.5 = a seeded half). The optional
``replay`` category gets no weight: bucket k receives round(share * n / (1 - share)) replay rows,
where n is the bucket's other rows, so replay is ``share`` of every bucket's rows (= tokens: rows
have equal length; a padded tail row counts as a full row). Replay rows are drawn from a stream of
seeded permutations of all replay rows, so none repeats before all have been used.

Output: a ``datasets.load_from_disk`` directory of one Dataset with int32 columns (a 69k vocabulary
overflows uint16), byte-identical for equal inputs and config, whatever ``num_threads``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cptflow.cli import stage_main
from cptflow.config import ConfigError, from_dict, to_dict
from cptflow.hf import load_tokenizer, raw_text_encoder, write_arrow_dataset
from cptflow.io import atomic_path, write_json
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
TAILS = ("drop", "pad")
log = logging.getLogger("cptflow.pack")


@dataclass(frozen=True)
class ReplayConfig:
    """English replay: a fixed share of the final rows, whatever the other categories add up to."""

    category: str = "en_replay"  # category name as given to --shards
    share: float = 0.1  # fraction of each bucket's rows (and tokens) that are replay, in [0, 1)


@dataclass(frozen=True)
class PackConfig:
    """Sample length, document boundaries, tail handling and the category mixture."""

    max_length: int = 2048  # tokens per sample (row)
    add_bos: bool = True  # BOS at each document start
    add_eos: bool = True  # EOS at each document end
    tail: str = "pad"  # last partial row of a category: pad (keep, pad to max_length) | drop
    pad_token_id: int | None = None  # id used for padding; null = the tokenizer's EOS
    num_bins: int = 10  # bins per category = buckets in the output
    seed: int = 0  # run seed for every shuffle and subsample
    categories: dict[str, float] = field(default_factory=dict)  # name -> weight; {} = all given, weight 1
    # Optional[...] rather than `| None`: cptflow.config.from_dict builds nested dataclasses inside
    # typing.Union but (as of writing) not inside a PEP 604 `X | None` union.
    replay: Optional[ReplayConfig] = None  # replay category and share; null = no replay
    num_threads: int = 0  # tokenizer threads (RAYON_NUM_THREADS); 0 = the tokenizers default (all cores)
    batch_docs: int = 1000  # documents per encode_batch call (bounds memory of one call)
    max_shard_mb: int = 500  # max size of one arrow file, as save_to_disk's default

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError("pack.max_length must be >= 2")
        if self.tail not in TAILS:
            raise ConfigError(f"pack.tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if self.num_bins < 1 or self.batch_docs < 1 or self.max_shard_mb < 1 or self.num_threads < 0:
            raise ConfigError("pack: num_bins, batch_docs, max_shard_mb must be >= 1 and num_threads >= 0")
        for name, w in self.categories.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"pack.categories.{name}: weight must be a number >= 0, got {w!r}")
        if self.replay is not None:
            if not 0 <= self.replay.share < 1:
                raise ConfigError("pack.replay.share must be in [0, 1)")
            if self.replay.category in self.categories:
                raise ConfigError(f"pack.replay.category {self.replay.category!r} must not also be in "
                                  "pack.categories: its amount is set by replay.share")


@dataclass
class Packed:
    """One category spliced into rows."""

    input_ids: np.ndarray  # [rows, max_length] int32
    position_ids: np.ndarray  # [rows, max_length] int32
    real_len: np.ndarray  # [rows] int32: tokens before padding (max_length except a padded tail)
    counts: dict[str, int]


def read_texts(path: str | Path) -> list[str]:
    """The ``text`` column of one parquet shard; a null or missing text is an error naming the row."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    if "text" not in names:
        raise ValueError(f"{path}: no 'text' column (columns: {', '.join(names)})")
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{path}: row {i}: 'text' is {type(t).__name__}, not a string")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str], batch_docs: int) -> list[np.ndarray]:
    """Token ids per document, through the Rust ``encode_batch_fast`` (3-5x ``tok(list)``).

    A literal "</s>" in a web page is text, not EOS (``raw_text_encoder``), so only the BOS/EOS that
    splicing adds mark document boundaries.
    """
    backend = raw_text_encoder(tokenizer)
    out: list[np.ndarray] = []
    for i in range(0, len(texts), batch_docs):
        for enc in backend.encode_batch_fast(list(texts[i: i + batch_docs]), add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=np.int32))
    return out


def splice(docs: Sequence[np.ndarray], max_length: int, bos: int | None, eos: int | None,
           tail: str, pad_id: int) -> Packed:
    """Concatenate documents (with BOS/EOS when given) into ``max_length`` rows; see module doc."""
    parts: list[np.ndarray] = []
    lens = np.zeros(len(docs), dtype=np.int64)
    bos_a = np.array([bos], np.int32) if bos is not None else None
    eos_a = np.array([eos], np.int32) if eos is not None else None
    for i, d in enumerate(docs):
        for p in (bos_a, d, eos_a):
            if p is not None:
                parts.append(p)
        lens[i] = len(d) + (bos is not None) + (eos is not None)
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    total = len(stream)
    starts = np.cumsum(lens) - lens
    rows_full, rem = divmod(total, max_length)
    pad = max_length - rem if rem and tail == "pad" else 0
    keep = total if tail == "pad" else rows_full * max_length
    ids = np.concatenate([stream[:keep], np.full(pad, pad_id, np.int32)])
    seg = np.zeros(len(ids), dtype=bool)
    seg[starts[starts < keep]] = True  # document starts
    seg[::max_length] = True  # row starts: continuations restart at 0
    if pad:
        seg[keep] = True  # padding is its own segment
    idx = np.arange(len(ids), dtype=np.int64)
    pos = (idx - np.maximum.accumulate(np.where(seg, idx, 0))).astype(np.int32)
    n_rows = len(ids) // max_length
    real_len = np.full(n_rows, max_length, np.int32)
    if pad:
        real_len[-1] = rem
    first_row, last_row = starts // max_length, (starts + lens - 1) // max_length
    counts = {
        "docs": len(docs), "doc_tokens": int(total - len(docs) * ((bos is not None) + (eos is not None))),
        "stream_tokens": int(total), "docs_split": int(np.sum(last_row > first_row)),
        "rows_packed": n_rows, "tail_tokens_dropped": int(total - keep), "padding_tokens": int(pad),
    }
    return Packed(ids.reshape(n_rows, max_length), pos.reshape(n_rows, max_length), real_len, counts)


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator per (purpose, category, bucket): results do not depend on iteration order."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys)])


def draw(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices into range(m): whole passes first, then a seeded subset without replacement."""
    if n and not m:
        raise ValueError("cannot draw rows from an empty bin")
    reps, rest = divmod(n, m) if m else (0, 0)
    return np.concatenate([np.tile(np.arange(m), reps), np.sort(rng.choice(m, rest, replace=False))])


def plan_buckets(rows: dict[str, int], weights: dict[str, float], cfg: PackConfig) -> list[list[tuple[str, np.ndarray]]]:
    """Per bucket, the (category, row indices) it holds, before the within-bucket shuffle.

    ``rows`` has every category's packed row count; ``weights`` the non-replay ones' weights.
    """
    plan: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(cfg.num_bins)]
    for cat in sorted(weights):
        bins = np.array_split(_rng(cfg.seed, "bins", cat).permutation(rows[cat]), cfg.num_bins)
        for k, b in enumerate(bins):
            n = int(np.floor(weights[cat] * len(b) + 0.5))
            plan[k].append((cat, b[draw(len(b), n, _rng(cfg.seed, "weight", cat, k))]))
    if cfg.replay is not None:
        cat, share = cfg.replay.category, cfg.replay.share
        rng, stream, need = _rng(cfg.seed, "replay", cat), np.zeros(0, np.int64), []
        for k in range(cfg.num_bins):
            n_other = sum(len(r) for _, r in plan[k])
            need.append(int(np.floor(share * n_other / (1 - share) + 0.5)))
        if sum(need) and not rows[cat]:
            raise ValueError(f"replay category {cat!r} has no samples")
        while len(stream) < sum(need):
            stream = np.concatenate([stream, rng.permutation(rows[cat])])
        offsets = np.cumsum([0, *need])
        for k in range(cfg.num_bins):
            plan[k].append((cat, stream[offsets[k]: offsets[k + 1]]))
    return plan


def bucket_order(plan: list[list[tuple[str, np.ndarray]]], names: list[str],
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten the plan into output order: (category index, row, bucket) per sample, each bucket shuffled."""
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    empty = np.zeros(0, np.int64)
    for k, parts in enumerate(plan):
        c = np.concatenate([np.full(len(r), names.index(n), np.int64) for n, r in parts] or [empty])
        r = np.concatenate([r for _, r in parts] or [empty]).astype(np.int64)
        perm = _rng(seed, "bucket", k).permutation(len(r))
        out.append((c[perm], r[perm], np.full(len(r), k, np.int64)))
    return tuple(np.concatenate([o[i] for o in out] or [empty]) for i in range(3))  # type: ignore[return-value]


def resolve_weights(categories: Sequence[str], cfg: PackConfig) -> dict[str, float]:
    """Weights of the non-replay categories; a category with shards but no weight is an error."""
    given = set(categories)
    replay = cfg.replay.category if cfg.replay else None
    if replay is not None and replay not in given:
        raise ValueError(f"pack.replay.category {replay!r} has no --shards")
    others = sorted(given - {replay})
    if not cfg.categories:
        return {c: 1.0 for c in others}
    missing = sorted(set(cfg.categories) - given)
    if missing:
        raise ValueError(f"pack.categories lists {', '.join(missing)} but no --shards were given for them")
    unweighted = [c for c in others if c not in cfg.categories]
    if unweighted:
        raise ValueError(f"--shards given for {', '.join(unweighted)}, which pack.categories does not list")
    return {c: float(cfg.categories[c]) for c in others}


def _tables(packed: dict[str, Packed], names: list[str], cats: np.ndarray, rows: np.ndarray,
            buckets: np.ndarray, max_length: int, batch_rows: int = 1000) -> Iterator[Any]:
    """Arrow tables built from numpy (no per-row Python), ``batch_rows`` rows at a time."""
    import pyarrow as pa

    for s in range(0, len(rows), batch_rows):
        c, r = cats[s: s + batch_rows], rows[s: s + batch_rows]
        ids = np.empty((len(r), max_length), np.int32)
        pos = np.empty_like(ids)
        real = np.empty(len(r), np.int32)
        for ci, name in enumerate(names):
            m = c == ci
            if m.any():
                ids[m], pos[m], real[m] = packed[name].input_ids[r[m]], packed[name].position_ids[r[m]], \
                    packed[name].real_len[r[m]]
        labels = np.where(np.arange(max_length) < real[:, None], ids, np.int32(-100)).astype(np.int32)
        offsets = pa.array(np.arange(0, (len(r) + 1) * max_length, max_length, dtype=np.int32))
        col = {k: pa.ListArray.from_arrays(offsets, pa.array(v.reshape(-1)))
               for k, v in (("input_ids", ids), ("labels", labels), ("position_ids", pos))}
        cat_col = pa.DictionaryArray.from_arrays(pa.array(c.astype(np.int32)), pa.array(names)).dictionary_decode()
        yield pa.table({**col, "category": cat_col, "bucket": pa.array(buckets[s: s + batch_rows].astype(np.int32))})


def run(cfg: PackConfig, tokenizer_dir: str | Path, shards: dict[str, list[str]], output_dir: str | Path,
        counts_path: str | Path, stats_path: str | Path | None = None) -> Stats:
    """Pack ``shards`` (category -> parquet files) into the dataset directory and the counts JSON."""
    from datasets import Features, Value

    try:
        from datasets import List as ListFeature
    except ImportError:  # datasets < 4
        from datasets import Sequence as ListFeature
    if cfg.num_threads:  # only effective before the tokenizers thread pool first starts in this process
        os.environ["RAYON_NUM_THREADS"] = str(cfg.num_threads)
    stats = Stats()
    with Timer() as timer:
        weights = resolve_weights(list(shards), cfg)
        tok = load_tokenizer(tokenizer_dir)
        bos = tok.bos_token_id if cfg.add_bos else None
        eos = tok.eos_token_id if cfg.add_eos else None
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else tok.eos_token_id
        if (cfg.add_bos and bos is None) or (cfg.add_eos and eos is None) or pad_id is None:
            raise ValueError(f"{tokenizer_dir}: tokenizer lacks the BOS/EOS/pad id this config needs")
        packed: dict[str, Packed] = {}
        for cat in sorted(shards):
            texts = [t for f in sorted(map(str, shards[cat])) for t in read_texts(f)]
            docs = [d for d in tokenize(tok, texts, cfg.batch_docs) if len(d)]
            stats.update("docs_in", len(texts))
            stats.update("chars_in", sum(map(len, texts)))
            for _ in range(len(texts) - len(docs)):
                stats.drop("pack_empty", 0)
            packed[cat] = splice(docs, cfg.max_length, bos, eos, cfg.tail, pad_id)
            packed[cat].counts["docs_empty"] = len(texts) - len(docs)
            log.info("%s: %d docs -> %d rows of %d", cat, len(docs), packed[cat].counts["rows_packed"], cfg.max_length)
        plan = plan_buckets({c: len(p.real_len) for c, p in packed.items()}, weights, cfg)
        names = sorted(packed)
        cats, rows, buckets = bucket_order(plan, names, cfg.seed)
        counts = _counts(packed, names, cats, rows, buckets, weights, cfg)
        rows_per_shard = max(1, cfg.max_shard_mb * 2**20 // (12 * cfg.max_length))
        n_shards = max(1, -(-len(rows) // rows_per_shard))
        features = Features({"input_ids": ListFeature(Value("int32")), "labels": ListFeature(Value("int32")),
                             "position_ids": ListFeature(Value("int32")), "category": Value("string"),
                             "bucket": Value("int32")})
        with atomic_path(output_dir) as tmp:
            sl = [slice(i * rows_per_shard, (i + 1) * rows_per_shard) for i in range(n_shards)]
            counts["fingerprint"] = write_arrow_dataset(tmp, features, [
                _tables(packed, names, cats[s], rows[s], buckets[s], cfg.max_length) for s in sl])
        write_json(counts_path, counts)
        for key in ("samples", "tokens", "padding_tokens"):
            stats.update(key, counts["total"][key])
        stats.update("docs_out", sum(p.counts["docs"] for p in packed.values()))
        stats.update("tail_tokens_dropped", sum(p.counts["tail_tokens_dropped"] for p in packed.values()))
    log.info("%d samples, %d tokens in %d buckets (%.1f s)", len(rows), counts["total"]["tokens"],
             cfg.num_bins, timer.seconds)
    if stats_path:
        inputs = [tokenizer_dir, *(f for c in sorted(shards) for f in sorted(map(str, shards[c])))]
        write_manifest(stats_path, stage="pack", version=VERSION, params=to_dict(cfg), inputs=inputs, stats=stats,
                       seconds=timer.seconds, outputs=[output_dir, counts_path])
    return stats


def _counts(packed: dict[str, Packed], names: list[str], cats: np.ndarray, rows: np.ndarray,
            buckets: np.ndarray, weights: dict[str, float], cfg: PackConfig) -> dict[str, Any]:
    """Samples and tokens per category per bucket, plus how each category was packed."""
    per_cat: dict[str, Any] = {}
    for ci, name in enumerate(names):
        m = cats == ci
        real = packed[name].real_len[rows[m]].astype(np.int64)
        per_bucket = [{"samples": int(np.sum(buckets[m] == k)), "tokens": int(real[buckets[m] == k].sum())}
                      for k in range(cfg.num_bins)]
        per_cat[name] = {**packed[name].counts, "weight": weights.get(name, "replay"), "samples": int(m.sum()),
                         "tokens": int(real.sum()), "buckets": per_bucket}
    tokens = int(sum(c["tokens"] for c in per_cat.values()))
    total = {"samples": len(rows), "tokens": tokens, "padding_tokens": len(rows) * cfg.max_length - tokens}
    out: dict[str, Any] = {"max_length": cfg.max_length, "tail": cfg.tail, "num_bins": cfg.num_bins,
                           "seed": cfg.seed, "categories": per_cat, "total": total,
                           "buckets": [{"samples": int(np.sum(buckets == k)),
                                        "tokens": sum(c["buckets"][k]["tokens"] for c in per_cat.values())}
                                       for k in range(cfg.num_bins)]}
    if cfg.replay is not None:
        n = per_cat[cfg.replay.category]["samples"]
        out["replay"] = {"category": cfg.replay.category, "share_target": cfg.replay.share,
                         "share_actual": n / len(rows) if len(rows) else 0.0}
    return out


def parse_shards(items: Sequence[str]) -> dict[str, list[str]]:
    """``CAT=PATH`` items (repeat a category for several files; a directory means its *.parquet)."""
    out: dict[str, list[str]] = {}
    for item in items:
        cat, sep, path = item.partition("=")
        if not sep or not cat or not path:
            raise ValueError(f"--shards item {item!r} is not CATEGORY=PATH")
        p = Path(path)
        files = sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [path]
        out.setdefault(cat, []).extend(files)
    return out


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (the expanded one)")
    p.add_argument("--shards", required=True, nargs="+", metavar="CAT=PATH",
                   help="category=parquet file or directory of *.parquet; repeat a category for more files")
    p.add_argument("--output-dir", required=True, help="dataset directory (datasets.load_from_disk)")
    p.add_argument("--counts", required=True, help="JSON of samples/tokens per category per bucket")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")
    p.add_argument("--threads", type=int, default=None, help="overrides pack.num_threads (the rule's threads)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    if args.threads is not None:
        params = {**params, "num_threads": args.threads}
    cfg = from_dict(PackConfig, params, "pack")
    run(cfg, args.tokenizer, parse_shards(args.shards), args.output_dir, args.counts, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("pack", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
