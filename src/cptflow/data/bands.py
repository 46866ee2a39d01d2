"""Dedup stage 2, one job per (band group, hash range): LSH buckets → candidate pairs → verified near-duplicate pairs.

A document's index is its position when the signature files are concatenated in the order given.
Group k of ``band_groups`` handles bands b with b % band_groups == k; range r of ``hash_ranges``
handles the documents whose band key falls in the r-th slice of the 64-bit key space, so the jobs
split both ways (datatrove splits its buckets by hash range the same way). In each band,
documents whose ``rows`` signature values are all equal share a key and a bucket; pairs from a
bucket are candidates. A bucket of at most ``max_bucket_all_pairs`` members gives all its pairs; a
larger one (boilerplate pages) gives each member paired with the bucket's first member and with
its predecessor, O(k) instead of O(k^2). With ``exact`` on, only the first document of each
exact-hash group takes part (the others have the same signature, so the same key and range, and
join its cluster through the exact hash), and the jobs of band 0 also emit those exact-hash edges,
so ``clusters`` never loads the hashes of the whole corpus.

Bounded memory: signature files store ``sig`` permutation-major (``cptflow.data.signature``), so a
job memory-maps each file and reads only its bands' rows, ``WINDOW_DOCS`` documents at a time, and
keeps (key, index, exact hash, band values) of the documents in its range, one band at a time: 48
bytes per document / hash_ranges, ~150 measured with the sort's temporaries (bench/RESULTS.md, scale). Candidates are verified with the estimated Jaccard similarity of
the full signatures (>= ``min_jaccard``; LSH alone lets through pairs well below it), read for the
candidate documents only, ``VERIFY_PAIRS`` pairs at a time, one file mapped at a time.

Output (.npz): ``pairs`` and ``exact_pairs`` int64 (m, 2), i < j, sorted; ``files``/``counts``/``sha256``
of the signature files (so ``clusters`` can check it is given the same list); ``group``, ``range``,
``band_groups``, ``hash_ranges``, ``params``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from cptflow.core import cli
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, sha256_file
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.data.minhash import DedupConfig, band_keys, estimate_jaccard
from cptflow.data.npzio import write_npz
from cptflow.data.signatures import FileSignatures, MemorySignatures, Signatures

VERSION = 2
log = logging.getLogger("cptflow.data.bands")
WINDOW_DOCS = 1 << 16  # documents per read of a band's rows: 65536 x 6 rows x 4 B = 1.5 MB
VERIFY_PAIRS = 1 << 16  # pairs verified per block: their documents' full signatures, <= 63 MB
EMPTY = np.empty((0, 2), dtype=np.int64)


def pairs_params_json(cfg: DedupConfig) -> str:
    """Settings the pairs depend on; clusters refuses pairs made with other settings."""
    keep = ("exact", "num_perm", "bands", "rows", "min_jaccard", "shingle_chars", "shingle_words", "seed",
            "band_groups", "hash_ranges", "max_bucket_all_pairs")
    return json.dumps({k: v for k, v in asdict(cfg).items() if k in keep}, sort_keys=True)


def group_bands(cfg: DedupConfig, group: int) -> list[int]:
    if not 0 <= group < cfg.band_groups:
        raise ValueError(f"dedup bands: --group {group} is outside 0..{cfg.band_groups - 1} (dedup.band_groups)")
    return [b for b in range(cfg.bands) if b % cfg.band_groups == group]


def key_range(keys: np.ndarray, ranges: int) -> np.ndarray:
    """Which of ``ranges`` equal slices of the 64-bit key space each key falls in."""
    return ((keys >> np.uint64(32)) * np.uint64(ranges)) >> np.uint64(32)


def bucket_pairs(keys: np.ndarray, max_all_pairs: int) -> np.ndarray:
    """Pairs of positions (into ``keys``) that share a key, (m, 2) int64, each pair (lower, higher)."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    if len(k) < 2:
        return EMPTY
    cut = np.flatnonzero(k[1:] != k[:-1]) + 1
    starts = np.concatenate([[0], cut])
    sizes = np.diff(np.concatenate([starts, [len(k)]]))
    found = []
    for size in np.unique(sizes[sizes >= 2]):
        st = starts[sizes == size]
        if size <= max_all_pairs:
            iu, ju = np.triu_indices(int(size), 1)
            found.append(np.stack([(st[:, None] + iu).ravel(), (st[:, None] + ju).ravel()], axis=1))
        else:
            for s in st:
                rest = np.arange(s + 1, s + size)
                found.append(np.stack([np.full(len(rest), s), rest], axis=1))  # star on the first member
                found.append(np.stack([rest[:-1], rest[1:]], axis=1))  # chain to the predecessor
    if not found:
        return EMPTY
    pos = order[np.concatenate(found)]
    return np.sort(pos, axis=1).astype(np.int64)


def unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """Deduplicated (i, j) pairs sorted by i then j."""
    if len(pairs) == 0:
        return EMPTY
    code = np.unique(pairs[:, 0] * np.int64(n) + pairs[:, 1])
    return np.stack([code // n, code % n], axis=1).astype(np.int64)


def chain_equal(values: np.ndarray) -> np.ndarray:
    """Edges chaining the positions of equal values, (m, 2): one connected chain per distinct value."""
    order = np.argsort(values, kind="stable")
    same = np.flatnonzero(values[order][1:] == values[order][:-1])
    return np.stack([order[same], order[same + 1]], axis=1).astype(np.int64)


def verified(pairs: np.ndarray, sigs: Signatures, min_jaccard: float) -> np.ndarray:
    """The pairs whose estimated Jaccard similarity (full signatures) is at least ``min_jaccard``."""
    keep = np.zeros(len(pairs), dtype=bool)
    for s in range(0, len(pairs), VERIFY_PAIRS):
        p = pairs[s:s + VERIFY_PAIRS]
        docs = np.unique(p)
        full = sigs.gather(docs)
        a, b = np.searchsorted(docs, p[:, 0]), np.searchsorted(docs, p[:, 1])
        keep[s:s + len(p)] = estimate_jaccard(full[a], full[b]) >= min_jaccard - 1e-12
    return pairs[keep]


def band_candidates(sigs: Signatures, cfg: DedupConfig, band: int, hash_range: int,
                    with_exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """(candidate pairs, exact-hash edges) among the documents whose key of ``band`` is in ``hash_range``."""
    keys, idx, vals, exact = [], [], [], []
    for f, n in enumerate(sigs.counts):
        for lo in range(0, n, WINDOW_DOCS):
            hi = min(n, lo + WINDOW_DOCS)
            part = sigs.band_window(f, band, cfg.rows, lo, hi)
            k = band_keys(part, band)
            sel = np.flatnonzero(key_range(k, cfg.hash_ranges) == hash_range)
            keys.append(k[sel])
            idx.append(sigs.offsets[f] + lo + sel)
            vals.append(part[sel])
            if with_exact:
                exact.append(sigs.exact_window(f, lo, hi)[sel])
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    i = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    v = np.concatenate(vals) if vals else np.zeros((0, cfg.rows), np.uint32)
    exact_edges = EMPTY
    if with_exact:  # one representative per exact-hash group: its first document
        e = np.concatenate(exact) if exact else np.zeros(0, np.uint64)
        if band == 0:
            exact_edges = i[chain_equal(e)]
        first = np.sort(np.unique(e, return_index=True)[1])
        k, i, v = k[first], i[first], v[first]
    pos = bucket_pairs(k, cfg.max_bucket_all_pairs)
    pos = pos[(v[pos[:, 0]] == v[pos[:, 1]]).all(axis=1)]  # drop 64-bit key collisions
    return i[pos], exact_edges


def search(sigs: Signatures, cfg: DedupConfig, bands: Sequence[int], stats: Stats,
           hash_range: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(verified near-duplicate pairs, exact-hash edges) from the given bands and hash range."""
    with_exact = cfg.exact and sigs.has_exact
    found, exact_edges = [], EMPTY
    for b in bands:
        cand, edges = band_candidates(sigs, cfg, b, hash_range, with_exact)
        stats.update("candidates_with_repeats", len(cand))
        found.append(cand)
        if b == 0:
            exact_edges = np.sort(edges, axis=1)
    cand = unique_pairs(np.concatenate(found) if found else EMPTY, max(sigs.n, 1))
    pairs = verified(cand, sigs, cfg.min_jaccard)
    stats.update("candidates", len(cand))
    stats.update("pairs", len(pairs))
    stats.update("pairs_rejected", len(cand) - len(pairs))
    stats.update("exact_edges", len(exact_edges))
    return pairs, exact_edges


def find_pairs(sig: np.ndarray, exact: np.ndarray | None, cfg: DedupConfig, bands: Sequence[int],
               stats: Stats | None = None) -> np.ndarray:
    """Verified near-duplicate pairs among in-memory signatures (n, num_perm) (pure); ``exact`` None: no grouping."""
    return search(MemorySignatures(sig, exact), cfg, bands, stats if stats is not None else Stats())[0]


def run(cfg: DedupConfig, signature_paths: Sequence[PathLike], group: int, output: PathLike,
        stats_path: PathLike, hash_range: int = 0) -> Stats:
    if not 0 <= hash_range < cfg.hash_ranges:
        raise ValueError(f"dedup bands: --range {hash_range} is outside 0..{cfg.hash_ranges - 1} (dedup.hash_ranges)")
    stats = Stats()
    with Timer() as t:
        bands = group_bands(cfg, group)
        sigs = FileSignatures(signature_paths, cfg)
        stats.update("docs_in", sigs.n)
        stats.update("bands", len(bands))
        pairs, exact_pairs = search(sigs, cfg, bands, stats, hash_range)
        write_npz(output, {
            "pairs": pairs,
            "exact_pairs": exact_pairs,
            "files": np.array([os.path.normpath(str(p)) for p in signature_paths], dtype=str),
            "counts": np.asarray(sigs.counts, dtype=np.int64),
            "sha256": np.array([sha256_file(p) for p in signature_paths], dtype=str),
            "group": np.array(group, dtype=np.int64),
            "range": np.array(hash_range, dtype=np.int64),
            "band_groups": np.array(cfg.band_groups, dtype=np.int64),
            "hash_ranges": np.array(cfg.hash_ranges, dtype=np.int64),
            "params": np.array(pairs_params_json(cfg)),
        })
    log.info("group %d range %d (bands %s): %d documents, %d candidate pairs, %d verified (Jaccard >= %.2f), "
             "%d exact-hash edges", group, hash_range, bands, stats["docs_in"], stats["candidates"], stats["pairs"],
             cfg.min_jaccard, stats["exact_edges"])
    write_manifest(stats_path, stage="dedup_bands", version=VERSION,
                   params=to_dict(cfg) | {"group": group, "range": hash_range}, inputs=signature_paths,
                   stats=stats, seconds=t.seconds, outputs=[output])
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--signatures", nargs="+", required=True, help="all signature files, in a fixed order")
        p.add_argument("--group", type=int, required=True, help="band group handled by this job (0-based)")
        p.add_argument("--range", type=int, default=0, dest="hash_range",
                       help="hash range handled by this job (0-based, < dedup.hash_ranges)")
        p.add_argument("--output", required=True, help="verified pairs (.npz)")
        p.add_argument("--stats", required=True)

    def go(args, params):
        verify_inputs(args.signatures)
        run(from_dict(DedupConfig, params, "dedup"), args.signatures, args.group, args.output, args.stats,
            args.hash_range)

    return cli.stage_main("dedup_bands", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
