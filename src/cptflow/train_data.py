"""The order in which training sees the packed samples, and how a global batch is split over ranks.

The pack stage writes one Dataset whose rows are bucket 0 first, then bucket 1, ... (each bucket holds
a slice of every category, so each bucket is a miniature of the whole mix). Training keeps that bucket
order — a curriculum knob and the reason a stage can select buckets — and shuffles *within* each
bucket with a permutation seeded by (seed, epoch, bucket). That gives one *global* sample order that
does not depend on the number of processes:

    global position p  ->  epoch p // n, row order_epoch[p % n]

Step s consumes the positions [offset, offset + global_batch); rank r takes every world_size-th of
them (r, r + W, ...), so ranks see disjoint samples and their union is exactly the global batch. A
checkpoint stores only ``offset`` (samples consumed): a resumed run continues at the same position
without replaying anything, with any number of processes, as long as the global batch is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("cptflow.train_data")

COLUMNS = ("input_ids", "labels", "position_ids", "category", "bucket")
IGNORE_INDEX = -100  # labels value on padding (the Hugging Face / PyTorch cross-entropy convention)


def select_rows(
    category_codes: np.ndarray,
    category_names: Sequence[str],
    buckets: np.ndarray,
    want_categories: Sequence[str] | None,
    want_buckets: Sequence[int] | None,
    where: str = "data",
) -> np.ndarray:
    """Row ids (ascending) whose category and bucket are selected; errors name what is missing.

    Categories come dictionary-encoded (row -> index into ``category_names``): millions of rows stay
    an int array instead of millions of Python strings. Also checks the pack stage's promise that
    rows are sorted by bucket: the curriculum depends on it.
    """
    buckets = np.asarray(buckets, dtype=np.int64)
    if buckets.size and np.any(np.diff(buckets) < 0):
        bad = int(np.argmax(np.diff(buckets) < 0)) + 1
        raise ValueError(f"{where}: row {bad}: bucket {buckets[bad]} after bucket {buckets[bad - 1]}; "
                         "rows must be sorted by bucket")
    keep = np.ones(buckets.shape[0], dtype=bool)
    if want_categories is not None:
        names = list(category_names)
        missing = sorted(set(want_categories) - set(names))
        if missing:
            raise ValueError(f"{where}: categories {missing} not in the data; it has {sorted(names)}")
        keep &= np.isin(np.asarray(category_codes), [names.index(c) for c in want_categories])
    if want_buckets is not None:
        known_b = sorted(set(np.unique(buckets).tolist()))
        missing_b = sorted(set(want_buckets) - set(known_b))
        if missing_b:
            raise ValueError(f"{where}: buckets {missing_b} not in the data; it has {known_b}")
        keep &= np.isin(buckets, list(want_buckets))
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise ValueError(f"{where}: no rows selected (categories={want_categories}, buckets={want_buckets})")
    return rows


class SampleOrder:
    """The global sample order over the selected rows: bucket order kept, seeded shuffle inside buckets."""

    def __init__(self, rows: np.ndarray, buckets: np.ndarray, seed: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.row_buckets = np.asarray(buckets, dtype=np.int64)[self.rows]
        self.seed = int(seed)
        self.n = int(self.rows.size)
        self._cache: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row ids of one pass: bucket by bucket (ascending), each bucket permuted by its own seeded RNG."""
        if epoch not in self._cache:
            parts = []
            for b in np.unique(self.row_buckets):  # np.unique sorts: bucket 0 first
                members = self.rows[self.row_buckets == b]
                rng = np.random.default_rng([self.seed, epoch, int(b)])
                parts.append(members[rng.permutation(members.size)])
            self._cache = {epoch: np.concatenate(parts)}  # keep one epoch: a run moves forward
        return self._cache[epoch]

    def ids(self, start: int, count: int) -> np.ndarray:
        """Row ids at global positions [start, start + count), wrapping into later epochs."""
        out = np.empty(count, dtype=np.int64)
        for i, p in enumerate(range(start, start + count)):
            epoch, pos = divmod(p, self.n)
            out[i] = self.epoch_order(epoch)[pos]
        return out


def rank_share(global_ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank r's samples of a global batch: positions r, r + W, r + 2W, ... (disjoint, covering)."""
    if global_ids.size % world_size:
        raise ValueError(f"global batch {global_ids.size} is not divisible by world size {world_size}")
    return global_ids[rank::world_size]


def open_dataset(data_dir: str | Path) -> tuple[Any, int]:
    """Load the packed Dataset (memory-mapped) and return it with its sample length."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(data_dir))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{data_dir}: not a dataset saved by datasets.save_to_disk ({e})") from e
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{data_dir}: expected one Dataset, found {type(ds).__name__}")
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{data_dir}: missing column(s) {missing}; has {ds.column_names}")
    if getattr(ds, "_indices", None) is not None:  # a select()ed dataset: make row ids physical
        ds = ds.flatten_indices()
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: the dataset has no rows")
    length = len(ds[0]["input_ids"])
    return ds, length


def index_columns(ds: Any) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The small columns that define the order: (category codes, category names, buckets)."""
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    enc = table.column("category").combine_chunks().dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    buckets = table.column("bucket").to_numpy().astype(np.int64)
    return codes, enc.dictionary.to_pylist(), buckets


def load_rows(ds: Any, row_ids: np.ndarray, length: int, where: str = "data") -> dict[str, np.ndarray]:
    """The token columns of ``row_ids`` as int64 arrays [n, length] (embedding lookup wants int64)."""
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    taken = table.take(np.asarray(row_ids, dtype=np.int64))
    out: dict[str, np.ndarray] = {}
    for col in ("input_ids", "labels", "position_ids"):
        arr = taken.column(col).combine_chunks()
        flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        if flat.size != len(row_ids) * length:
            raise ValueError(f"{where}: column {col}: rows {list(row_ids)} are not all of length {length}")
        out[col] = flat.reshape(len(row_ids), length)
    return out


def count_targets(labels: np.ndarray) -> int:
    """Tokens the loss is computed on: labels shift by one inside the model, so position 0 never is."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
