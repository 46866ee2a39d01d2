"""Mixing packed categories into buckets (the pure core of ``pack``).

Every category's rows are shuffled (seeded) and cut into ``num_bins`` bins; bucket k is bin
k of every category, shuffled together, and the dataset is bucket 0, then bucket 1, ... — so each
stretch of training sees the same mixture instead of one category after another. Category weights
are applied per bin: a bin of m rows contributes round(w * m) rows, i.e. every row floor(w) times
plus a seeded subset for the fraction (2.0 = each row twice, 0.5 = a seeded half). The optional
``replay`` category gets no weight: bucket k receives round(share * n / (1 - share)) replay rows,
where n is the bucket's other rows, so replay is ``share`` of every bucket's rows (= tokens: rows
have equal length; a padded tail row counts as a full row). Replay rows are drawn from a stream of
seeded permutations of all replay rows, so none repeats before all have been used.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from cptflow.pack.pack_config import PackConfig


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
        order = _rng(cfg.seed, "bins", cat).permutation(rows[cat]).astype(row_dtype(rows[cat]))  # 4 bytes a row
        bins = np.array_split(order, cfg.num_bins)
        for k, b in enumerate(bins):
            n = int(np.floor(weights[cat] * len(b) + 0.5))
            plan[k].append((cat, b[draw(len(b), n, _rng(cfg.seed, "weight", cat, k))].astype(row_dtype(rows[cat]))))
    if cfg.replay is not None:
        cat, share = cfg.replay.category, cfg.replay.share
        rng, stream, need = _rng(cfg.seed, "replay", cat), np.zeros(0, row_dtype(rows[cat])), []
        for k in range(cfg.num_bins):
            n_other = sum(len(r) for _, r in plan[k])
            need.append(int(np.floor(share * n_other / (1 - share) + 0.5)))
        if sum(need) and not rows[cat]:
            raise ValueError(f"replay category {cat!r} has no samples")
        while len(stream) < sum(need):
            stream = np.concatenate([stream, rng.permutation(rows[cat]).astype(stream.dtype)])
        offsets = np.cumsum([0, *need])
        for k in range(cfg.num_bins):
            plan[k].append((cat, stream[offsets[k]: offsets[k + 1]].astype(row_dtype(rows[cat]))))
    return plan


def row_dtype(rows: int) -> np.dtype:
    """Row indices of a category in 4 bytes while they fit (the layout step's memory is per sample)."""
    return np.dtype(np.uint32) if rows <= 2**32 else np.dtype(np.int64)


def bucket_order(plan: list[list[tuple[str, np.ndarray]]], names: list[str],
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten the plan into output order: (category index, row, bucket) per sample, each bucket shuffled.

    Written bucket by bucket into arrays of the final size and narrow dtypes (uint16, uint32, int32:
    10 bytes a sample), so only one bucket's shuffle is ever held twice. The plan is consumed: each
    bucket's parts are dropped once written, so the plan and the output are not both held whole.
    """
    n = sum(len(r) for parts in plan for _, r in parts)
    top = max((int(r.max()) + 1 for parts in plan for _, r in parts if len(r)), default=0)
    cats, rows, buckets = np.empty(n, np.uint16), np.empty(n, row_dtype(top)), np.empty(n, np.int32)
    at = 0
    for k, parts in enumerate(plan):
        m = sum(len(r) for _, r in parts)
        perm = _rng(seed, "bucket", k).permutation(m)
        c = np.concatenate([np.full(len(r), names.index(name), np.uint16) for name, r in parts] or [cats[:0]])
        r = np.concatenate([r for _, r in parts] or [rows[:0]])
        cats[at:at + m], rows[at:at + m], buckets[at:at + m] = c[perm], r[perm], k
        parts.clear()
        at += m
    return cats, rows, buckets


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
