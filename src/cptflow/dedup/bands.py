"""Dedup stage 2, one job per band group: LSH buckets → candidate pairs → verified near-duplicate pairs.

A document's index is its position when the signature files are concatenated in the order given.
Group k of ``band_groups`` handles bands b with b % band_groups == k. In each band, documents whose
``rows`` signature values are all equal share a bucket; pairs from a bucket are candidates. A bucket
of at most ``max_bucket_all_pairs`` members gives all its pairs; a larger one (boilerplate pages)
gives each member paired with the bucket's first member and with its predecessor, O(k) instead of
O(k^2). With ``exact`` on, only the first document of each exact-hash group takes part: the others
have the same signature and join its cluster through the exact hash anyway.

Every candidate is then verified with the estimated Jaccard similarity of the full signatures
(>= ``min_jaccard``); LSH alone lets through pairs well below the threshold. Output (.npz):
``pairs`` int64 (m, 2), i < j, sorted; ``files``/``counts``/``sha256`` of the signature files (so
``clusters`` can check it is given the same list); ``group``, ``band_groups``, ``params``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from cptflow import cli
from cptflow.config import from_dict, to_dict
from cptflow.dedup.minhash import DedupConfig, band_keys, estimate_jaccard
from cptflow.dedup.npzio import read_npz, write_npz
from cptflow.io import PathLike, sha256_file
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
log = logging.getLogger("cptflow.dedup.bands")
_VERIFY_CHUNK = 65536  # pairs compared per block: 65536 x 128 x 4 B x 2 = 64 MB


def pairs_params_json(cfg: DedupConfig) -> str:
    """Settings the pairs depend on; clusters refuses pairs made with other settings."""
    keep = ("exact", "num_perm", "bands", "rows", "min_jaccard", "shingle_chars", "shingle_words", "seed",
            "band_groups", "max_bucket_all_pairs")
    return json.dumps({k: v for k, v in asdict(cfg).items() if k in keep}, sort_keys=True)


def group_bands(cfg: DedupConfig, group: int) -> list[int]:
    if not 0 <= group < cfg.band_groups:
        raise ValueError(f"dedup bands: --group {group} is outside 0..{cfg.band_groups - 1} (dedup.band_groups)")
    return [b for b in range(cfg.bands) if b % cfg.band_groups == group]


def load_signatures(paths: Sequence[PathLike], cfg: DedupConfig, keys: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Read signature files, checking they were made with this config (a stale file is an error)."""
    want = cfg.signature_params_json()
    out = []
    for p in paths:
        z = read_npz(p, [*keys, "params"])
        if str(z["params"]) != want:
            raise ValueError(f"{p}: signatures were made with {z['params']}, but the config says {want}; "
                             "rerun the signature stage")
        out.append(z)
    return out


def bucket_pairs(keys: np.ndarray, max_all_pairs: int) -> np.ndarray:
    """Pairs of positions (into ``keys``) that share a key, (m, 2) int64, each pair (lower, higher)."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    if len(k) < 2:
        return np.empty((0, 2), dtype=np.int64)
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
        return np.empty((0, 2), dtype=np.int64)
    pos = order[np.concatenate(found)]
    return np.sort(pos, axis=1).astype(np.int64)


def unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """Deduplicated (i, j) pairs sorted by i then j."""
    if len(pairs) == 0:
        return pairs.reshape(0, 2).astype(np.int64)
    code = np.unique(pairs[:, 0] * np.int64(n) + pairs[:, 1])
    return np.stack([code // n, code % n], axis=1).astype(np.int64)


def verified(pairs: np.ndarray, sig: np.ndarray, min_jaccard: float) -> np.ndarray:
    """The pairs whose estimated Jaccard similarity is at least ``min_jaccard``."""
    keep = np.zeros(len(pairs), dtype=bool)
    for s in range(0, len(pairs), _VERIFY_CHUNK):
        p = pairs[s:s + _VERIFY_CHUNK]
        keep[s:s + len(p)] = estimate_jaccard(sig[p[:, 0]], sig[p[:, 1]]) >= min_jaccard - 1e-12
    return pairs[keep]


def find_pairs(sig: np.ndarray, exact: np.ndarray | None, cfg: DedupConfig, bands: Sequence[int],
               stats: Stats | None = None) -> np.ndarray:
    """Verified near-duplicate pairs among all documents, from the given bands (pure)."""
    stats = stats if stats is not None else Stats()
    n = len(sig)
    if exact is not None:  # one representative per exact-hash group (its first document)
        members = np.sort(np.unique(exact, return_index=True)[1]).astype(np.int64)
    else:
        members = np.arange(n, dtype=np.int64)
    sub = sig[members]
    found = []
    for b in bands:
        pos = bucket_pairs(band_keys(sub, b, cfg.rows), cfg.max_bucket_all_pairs)
        sl = slice(b * cfg.rows, (b + 1) * cfg.rows)
        pos = pos[(sub[pos[:, 0], sl] == sub[pos[:, 1], sl]).all(axis=1)]  # drop 64-bit key collisions
        stats.update("candidates_with_repeats", len(pos))
        found.append(members[pos])
    cand = unique_pairs(np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64), n)
    pairs = verified(cand, sig, cfg.min_jaccard)
    stats.update("candidates", len(cand))
    stats.update("pairs", len(pairs))
    stats.update("pairs_rejected", len(cand) - len(pairs))
    return pairs


def run(cfg: DedupConfig, signature_paths: Sequence[PathLike], group: int, output: PathLike,
        stats_path: PathLike) -> Stats:
    stats = Stats()
    with Timer() as t:
        bands = group_bands(cfg, group)
        files = load_signatures(signature_paths, cfg, ["sig", "exact"])
        counts = np.array([len(z["sig"]) for z in files], dtype=np.int64)
        sig = np.concatenate([z["sig"] for z in files]) if files else np.empty((0, cfg.num_perm), np.uint32)
        exact = np.concatenate([z["exact"] for z in files]) if cfg.exact and files else None
        stats.update("docs_in", int(counts.sum()))
        stats.update("bands", len(bands))
        pairs = find_pairs(sig, exact, cfg, bands, stats)
        write_npz(output, {
            "pairs": pairs,
            "files": np.array([os.path.normpath(str(p)) for p in signature_paths], dtype=str),
            "counts": counts,
            "sha256": np.array([sha256_file(p) for p in signature_paths], dtype=str),
            "group": np.array(group, dtype=np.int64),
            "band_groups": np.array(cfg.band_groups, dtype=np.int64),
            "params": np.array(pairs_params_json(cfg)),
        })
    log.info("group %d (bands %s): %d documents, %d candidate pairs, %d verified (Jaccard >= %.2f)", group, bands,
             stats["docs_in"], stats["candidates"], stats["pairs"], cfg.min_jaccard)
    write_manifest(stats_path, stage="dedup_bands", version=VERSION, params=to_dict(cfg) | {"group": group},
                   inputs=signature_paths, stats=stats, seconds=t.seconds, outputs=[output])
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--signatures", nargs="+", required=True, help="all signature files, in a fixed order")
        p.add_argument("--group", type=int, required=True, help="band group handled by this job (0-based)")
        p.add_argument("--output", required=True, help="verified pairs (.npz)")
        p.add_argument("--stats", required=True)

    def go(args, params):
        run(from_dict(DedupConfig, params, "dedup"), args.signatures, args.group, args.output, args.stats)

    return cli.stage_main("dedup_bands", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
