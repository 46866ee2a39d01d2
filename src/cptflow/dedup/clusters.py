"""Dedup stage 3, the one global job: union-find over duplicates → one kept document per cluster.

Edges are (a) documents with the same exact hash (if ``exact``) and (b) the verified near pairs of
every band group. In each connected component ONE document is kept: the one whose id is smallest in
plain string (code point) order. The rule depends only on the ids in the cluster, never on file order
or on which job found which pair, so reruns are stable: adding a file changes existing drop lists
only where one of its documents sorts before the current keeper of a cluster it joins.

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

from cptflow import cli
from cptflow.config import from_dict, to_dict
from cptflow.dedup.bands import load_signatures, pairs_params_json
from cptflow.dedup.minhash import DedupConfig
from cptflow.dedup.npzio import read_npz
from cptflow.io import PathLike, sha256_file, write_jsonl
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
log = logging.getLogger("cptflow.dedup.clusters")


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Label of every node = the smallest node index of its component (vectorised union-find).

    Each round hooks the larger root of every unsatisfied edge under the smaller one, then
    compresses paths fully; parents only ever decrease, so a root is its component's minimum.
    """
    parent = np.arange(n, dtype=np.int64)
    u, v = edges[:, 0].astype(np.int64), edges[:, 1].astype(np.int64)
    while len(u):
        pu, pv = parent[u], parent[v]
        open_ = pu != pv  # an edge once satisfied stays satisfied: roots only merge
        u, v, pu, pv = u[open_], v[open_], pu[open_], pv[open_]
        if not len(u):
            break
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


def exact_edges(exact: np.ndarray) -> np.ndarray:
    """Edges chaining the documents of each exact-hash group, (m, 2)."""
    order = np.argsort(exact, kind="stable")
    same = np.flatnonzero(exact[order][1:] == exact[order][:-1])
    return np.stack([order[same], order[same + 1]], axis=1).astype(np.int64)


def choose_drops(ids: np.ndarray, exact: np.ndarray, edges: np.ndarray,
                 stats: Stats | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dropped indices, their kept indices, dropped-is-exact flags), dropped sorted by index (pure)."""
    stats = stats if stats is not None else Stats()
    n = len(ids)
    labels = connected_components(n, edges)
    sizes = np.bincount(labels, minlength=n)
    in_cluster = sizes[labels] >= 2
    order = np.argsort(ids, kind="stable")  # numpy compares unicode by code point, as Python's str does
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, labels, rank)
    kept = order[np.minimum(best[labels], n - 1)]
    dropped = np.flatnonzero(in_cluster & (kept != np.arange(n)))
    stats.update("clusters", int((sizes >= 2).sum()))
    stats.update("docs_in_clusters", int(in_cluster.sum()))
    stats.update("max_cluster_size", int(sizes.max()) if n else 0)
    is_exact = exact[dropped] == exact[kept[dropped]]
    stats.update("to_remove/dedup_exact", int(is_exact.sum()))
    stats.update("to_remove/dedup_near", int((~is_exact).sum()))
    return dropped, kept[dropped], is_exact


def _check_pairs_file(path: PathLike, z: dict, files: list[str], counts: np.ndarray, shas: list[str],
                      cfg: DedupConfig) -> int:
    if str(z["params"]) != pairs_params_json(cfg):
        raise ValueError(f"{path}: pairs were made with {z['params']}, not the current dedup config; rerun bands")
    made_from = [str(f) for f in z["files"]]
    if made_from != files or z["counts"].tolist() != counts.tolist() or [str(s) for s in z["sha256"]] != shas:
        raise ValueError(f"{path}: pairs were made from other signature files than --signatures "
                         f"({made_from} vs {files}, or their contents changed); rerun bands")
    return int(z["group"])


def run(cfg: DedupConfig, signature_paths: Sequence[PathLike], pairs_paths: Sequence[PathLike],
        drop_paths: Sequence[PathLike], stats_path: PathLike) -> Stats:
    if len(drop_paths) != len(signature_paths):
        raise ValueError(f"dedup clusters: {len(signature_paths)} signature files but {len(drop_paths)} drop lists")
    stats = Stats()
    with Timer() as t:
        sigs = load_signatures(signature_paths, cfg, ["ids", "exact", "chars"])
        ids = np.concatenate([z["ids"] for z in sigs]).astype(str)
        exact = np.concatenate([z["exact"] for z in sigs]).astype(np.uint64)
        chars = np.concatenate([z["chars"] for z in sigs]).astype(np.int64)
        counts = np.array([len(z["ids"]) for z in sigs], dtype=np.int64)
        file_of = np.repeat(np.arange(len(sigs)), counts)
        uniq, dup_count = np.unique(ids, return_counts=True)
        if (dup_count > 1).any():
            bad = uniq[dup_count > 1][0]
            where = sorted({str(signature_paths[f]) for f in file_of[ids == bad]})
            raise ValueError(f"document id {bad!r} occurs more than once (in {', '.join(where)}); ids must be unique")
        files = [os.path.normpath(str(p)) for p in signature_paths]
        shas = [sha256_file(p) for p in signature_paths]
        groups, pair_arrays = [], []
        for p in pairs_paths:
            z = read_npz(p, ["pairs", "files", "counts", "sha256", "group", "params"])
            groups.append(_check_pairs_file(p, z, files, counts, shas, cfg))
            pair_arrays.append(z["pairs"].reshape(-1, 2).astype(np.int64))
        if sorted(groups) != list(range(cfg.band_groups)):
            raise ValueError(f"dedup clusters: --pairs cover band groups {sorted(groups)}, "
                             f"need each of 0..{cfg.band_groups - 1} exactly once")
        edges = [*pair_arrays]
        if cfg.exact:
            edges.append(exact_edges(exact))
        edges_all = np.concatenate(edges) if edges else np.empty((0, 2), dtype=np.int64)
        stats.update("docs_in", len(ids))
        stats.update("near_pairs", sum(len(a) for a in pair_arrays))
        dropped, kept, is_exact = choose_drops(ids, exact, edges_all, stats)
        per_file = []
        # dropped is sorted by global index, hence grouped by file: one slice per file
        bounds = np.searchsorted(file_of[dropped], np.arange(len(drop_paths) + 1))
        for f, path in enumerate(drop_paths):
            sel = slice(bounds[f], bounds[f + 1])
            d, k, e = dropped[sel], kept[sel], is_exact[sel]
            recs = sorted(({"id": str(ids[i]), "reason": "dedup_exact" if ex else "dedup_near", "kept": str(ids[j])}
                           for i, j, ex in zip(d, k, e)), key=lambda r: r["id"])
            write_jsonl(path, recs)
            per_file.append({"signatures": str(signature_paths[f]), "drop_list": str(path), "docs": int(counts[f]),
                             "to_remove": len(recs), "chars_to_remove": int(chars[d].sum())})
    log.info("%d documents, %d clusters, %d to remove (%d exact, %d near), largest cluster %d", len(ids),
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
        run(from_dict(DedupConfig, params, "dedup"), args.signatures, args.pairs, args.drop_lists, args.stats)

    return cli.stage_main("dedup_clusters", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
