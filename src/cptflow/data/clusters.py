"""Dedup stage 3, the one global job: union-find over duplicates → one kept document per cluster.

Documents are integers: their position in the signature files concatenated in the order given (the
workflow's input order: sources as configured, files by name, lines in order), so the job never
holds the corpus's string ids, only one int per document. Edges are (a) the exact-hash chains and
(b) the verified near pairs that the bands jobs found. In each connected component ONE document is
kept: the first in input order, which union-find gives for free (every root is its component's
smallest index). The rule depends only on the files' order and the lines in them, never on which
job found which pair, so reruns are stable: adding a file changes existing drop lists only where one
of its documents comes before the current keeper of a cluster it joins.

Memory: 4 bytes per document (8 past 2^31 documents) for the union-find, plus the edges (16 bytes
each); ids, hashes and lengths are read from the memory-mapped signature files for the dropped and
kept documents only, one file at a time.

Output: one drop list per signature file (same order), JSONL sorted by id, one record per document
to remove: ``{"id", "reason": "dedup_exact" | "dedup_near", "kept": <id of the kept document>}``
(``dedup_exact`` when its normalised text hashes the same as the kept document's). A file with no
drops gets an empty file. Drop-list bytes depend only on content (no timestamps), so an unchanged
file's drop list is byte-identical across reruns and its downstream jobs can be skipped.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import numpy as np

from cptflow.core import cli
from cptflow.core.config import from_dict, to_dict
from cptflow.data.bands import pairs_params_json
from cptflow.data.minhash import DedupConfig
from cptflow.data.npzio import read_npz
from cptflow.data.signatures import FileSignatures
from cptflow.core.io import PathLike, sha256_file, write_jsonl
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest

VERSION = 2
log = logging.getLogger("cptflow.data.clusters")


def connected_components(n: int, edges: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Label of every node = the smallest node index of its component (vectorised union-find).

    Each round hooks the larger root of every unsatisfied edge under the smaller one, then
    compresses paths fully; parents only ever decrease, so a root is its component's minimum.
    Pointer jumping runs in place, ``chunk`` nodes at a time, so memory is the parent array itself.
    """
    dtype = np.int32 if n < 2**31 else np.int64
    parent = np.arange(n, dtype=dtype)
    u, v = edges[:, 0].astype(dtype), edges[:, 1].astype(dtype)
    while len(u):
        pu, pv = parent[u], parent[v]
        open_ = pu != pv  # an edge once satisfied stays satisfied: roots only merge
        u, v, pu, pv = u[open_], v[open_], pu[open_], pv[open_]
        if not len(u):
            break
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        changed = True
        while changed:  # parent[x] <- parent[parent[x]] until every node points at its root
            changed = False
            for s in range(0, n, chunk):
                cur = parent[s:s + chunk]
                nxt = parent[cur]
                if not changed and not np.array_equal(nxt, cur):
                    changed = True
                parent[s:s + chunk] = nxt
    return parent


def choose_drops(n: int, edges: np.ndarray, stats: Stats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(dropped indices, their kept indices), dropped ascending: everything but each cluster's first (pure)."""
    stats = stats if stats is not None else Stats()
    labels = connected_components(n, edges)
    step = 1 << 22  # compared a slice at a time: the job's memory stays the labels (4 bytes a document)
    dropped = np.concatenate([np.zeros(0, np.int64)] + [
        np.flatnonzero(labels[s:s + step] != np.arange(s, min(n, s + step), dtype=labels.dtype)) + s
        for s in range(0, n, step)])
    kept = labels[dropped].astype(np.int64)
    roots, sizes = np.unique(kept, return_counts=True)
    stats.update("clusters", len(roots))
    stats.update("docs_in_clusters", len(dropped) + len(roots))
    stats.update("max_cluster_size", int(sizes.max()) + 1 if len(sizes) else (1 if n else 0))
    return dropped, kept


def _check_pairs_file(path: PathLike, z: dict, files: list[str], counts: list[int], shas: list[str],
                      cfg: DedupConfig) -> tuple[int, int]:
    if str(z["params"]) != pairs_params_json(cfg):
        raise ValueError(f"{path}: pairs were made with {z['params']}, not the current dedup config; rerun bands")
    made_from = [str(f) for f in z["files"]]
    if made_from != files or z["counts"].tolist() != list(counts) or [str(s) for s in z["sha256"]] != shas:
        raise ValueError(f"{path}: pairs were made from other signature files than --signatures "
                         f"({made_from} vs {files}, or their contents changed); rerun bands")
    return int(z["group"]), int(z["range"])


def _by_id(ids: np.ndarray, *cols: np.ndarray) -> list[tuple]:
    """Rows (id, *cols) sorted by id (code point order, as Python compares str)."""
    order = np.argsort(ids, kind="stable")
    return [tuple(c[i] for c in (ids, *cols)) for i in order]


def run(cfg: DedupConfig, signature_paths: Sequence[PathLike], pairs_paths: Sequence[PathLike],
        drop_paths: Sequence[PathLike], stats_path: PathLike) -> Stats:
    if len(drop_paths) != len(signature_paths):
        raise ValueError(f"dedup clusters: {len(signature_paths)} signature files but {len(drop_paths)} drop lists")
    files = [os.path.normpath(str(p)) for p in signature_paths]
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:  # ids come from ingest as <source>/<part>:<line>, unique unless a file is given twice
        raise ValueError(f"dedup clusters: signature file(s) {', '.join(twice)} given more than once")
    stats = Stats()
    with Timer() as t:
        sigs = FileSignatures(signature_paths, cfg)
        n, offsets = sigs.n, sigs.offsets
        shas = [sha256_file(p) for p in signature_paths]
        seen, near, exact = [], [], []
        for p in pairs_paths:
            z = read_npz(p, ["pairs", "exact_pairs", "files", "counts", "sha256", "group", "range", "params"])
            seen.append(_check_pairs_file(p, z, files, sigs.counts, shas, cfg))
            near.append(z["pairs"].reshape(-1, 2).astype(np.int64))
            exact.append(z["exact_pairs"].reshape(-1, 2).astype(np.int64))
        want = [(g, r) for g in range(cfg.band_groups) for r in range(cfg.hash_ranges)]
        if sorted(seen) != want:
            raise ValueError(f"dedup clusters: --pairs cover band groups x hash ranges {sorted(seen)}, need each of "
                             f"{want} exactly once")
        edges = np.concatenate(near + exact) if near else np.empty((0, 2), dtype=np.int64)
        stats.update("docs_in", n)
        stats.update("near_pairs", sum(len(a) for a in near))
        stats.update("exact_pairs", sum(len(a) for a in exact))
        dropped, kept = choose_drops(n, edges, stats)
        kept_u = np.unique(kept)  # (a keeper keeps several documents)
        at = np.searchsorted(kept_u, kept)
        is_exact = sigs.member("exact", dropped) == sigs.member("exact", kept_u)[at] if len(dropped) else \
            np.zeros(0, bool)
        stats.update("to_remove/dedup_exact", int(is_exact.sum()))
        stats.update("to_remove/dedup_near", int((~is_exact).sum()))
        kept_ids = sigs.member("ids", kept_u)
        per_file = []
        bounds = np.searchsorted(dropped, offsets)  # dropped is sorted: one slice per file
        for f, path in enumerate(drop_paths):
            sel = slice(bounds[f], bounds[f + 1])
            d = dropped[sel]
            ids = sigs.member("ids", d)
            keeper = kept_ids[at[sel]]
            reason = np.where(is_exact[sel], "dedup_exact", "dedup_near")
            write_jsonl(path, ({"id": str(i), "reason": str(r), "kept": str(k)} for i, r, k in _by_id(ids, reason, keeper)))
            per_file.append({"signatures": str(signature_paths[f]), "drop_list": str(path),
                             "docs": int(sigs.counts[f]), "to_remove": len(d),
                             "chars_to_remove": int(sigs.member("chars", d).sum()) if len(d) else 0})
    log.info("%d documents, %d clusters, %d to remove (%d exact, %d near), largest cluster %d", n,
             stats["clusters"], len(dropped), stats["to_remove/dedup_exact"], stats["to_remove/dedup_near"],
             stats["max_cluster_size"])
    write_manifest(stats_path, stage="dedup_clusters", version=VERSION, params=to_dict(cfg),
                   inputs=[*signature_paths, *pairs_paths], stats=stats, seconds=t.seconds, outputs=drop_paths,
                   extra={"files": per_file})
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--signatures", nargs="+", required=True, help="all signature files, same order as bands got")
        p.add_argument("--pairs", nargs="+", required=True, help="the pairs file of every band group")
        p.add_argument("--drop-lists", nargs="+", required=True, help="one output per signature file, same order")
        p.add_argument("--stats", required=True)

    def go(args, params):
        verify_inputs([*args.signatures, *args.pairs])
        run(from_dict(DedupConfig, params, "dedup"), args.signatures, args.pairs, args.drop_lists, args.stats)

    return cli.stage_main("dedup_clusters", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
