"""The order in which training sees the packed samples, and how a global batch is split over ranks.

The pack stage writes an index over memory-mapped token shards (``cptflow.pack.packed``) whose
samples are bucket 0 first, then bucket 1, ... (each bucket holds a slice of every category, so each
bucket is a miniature of the whole mix). Training keeps that bucket order — a curriculum knob and
the reason a stage can select buckets — and shuffles *within* each bucket with a permutation seeded
by (seed, epoch, bucket). That gives one *global* sample order that does not depend on the number
of processes:

    global position p  ->  epoch p // n, row order_epoch[p % n]

Step s consumes the positions [offset, offset + global_batch); rank r takes every world_size-th of
them (r, r + W, ...), so ranks see disjoint samples and their union is exactly the global batch. A
checkpoint stores only ``offset`` (samples consumed): a resumed run continues at the same position
without replaying anything, with any number of processes, as long as the global batch is unchanged.

The loop reads the packed format only through the small functions at the end (``open_dataset``,
``index_columns``, ``load_rows``, ``count_targets``, ``real_tokens``, ``micro_batches``) and a
``Prefetcher`` that runs them in a background thread for the next steps. Only the rows a batch needs
are read from the memory-mapped shards; labels (the ids, -100 on padding and off a loss mask) and
position ids (restarting at every document) are derived from the stored document starts and row
lengths (``cptflow.pack.packed_reader``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptflow.model.modeling import IGNORE_INDEX
from cptflow.pack.packed_reader import PackedData

log = logging.getLogger("cptflow.train.data")


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


def open_dataset(data_dir: str | Path) -> tuple[PackedData, int]:
    """Open the packed data (memory-mapped; nothing is read yet) and return it with its sample length."""
    ds = PackedData(data_dir)
    if ds.n == 0:
        raise ValueError(f"{data_dir}: the packed data has no samples")
    return ds, ds.length


def index_columns(ds: PackedData) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The small arrays that define the order: (category codes, category names, buckets)."""
    return np.asarray(ds.category, np.int32), list(ds.names), np.asarray(ds.bucket, np.int64)


def load_rows(ds: PackedData, row_ids: np.ndarray, length: int, where: str = "data") -> dict[str, np.ndarray]:
    """input_ids, labels, position_ids of ``row_ids`` as int64 [n, length] (embedding lookup wants int64), and
    ``real`` (tokens before padding, per row)."""
    if length != ds.length:
        raise ValueError(f"{where}: samples have length {ds.length}, not {length}")
    return ds.take(np.asarray(row_ids, dtype=np.int64), where)


def read_batch(ds: Any, order: SampleOrder, offset: int, global_batch: int, rank: int, world_size: int,
               length: int, where: str = "data") -> dict[str, np.ndarray]:
    """This rank's share of the global batch at sample ``offset``: token columns plus the row ids (``ids``)."""
    mine = rank_share(order.ids(offset, global_batch), rank, world_size)
    return {**load_rows(ds, mine, length, where), "ids": mine}


def count_targets(labels: np.ndarray) -> int:
    """Tokens the loss is computed on: labels shift by one inside the model, so position 0 never is."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding positions of a batch: what tokens/s and MFU count (padding is work wasted).

    From the rows' ``real`` lengths when the batch has them (with a loss mask, fewer tokens have
    labels than are real), else the positions with a label.
    """
    if "real" in batch:
        return int(np.sum(batch["real"]))
    return int((batch["labels"] != IGNORE_INDEX).sum())


def micro_batches(batch: dict[str, torch.Tensor], micro: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """This rank's batch as micro-batches of the keyword arguments ``CausalLMLoss`` takes, on ``device``."""
    n = batch["input_ids"].shape[0]
    for i in range(0, n, micro):
        yield {k: batch[k][i:i + micro].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "labels")}


class Prefetcher:
    """Reads the batches of the coming steps in a background thread, ``depth`` steps ahead.

    ``read(i)`` returns step i's batch (numpy arrays); the thread turns it into torch tensors (pinned
    when ``pin``, so the copy to the GPU can overlap) and queues it. ``get()`` returns the next batch
    and the seconds the loop waited for it: ~0 when reading keeps up, the data-loading stall otherwise.
    ``depth`` 0 reads in the calling thread (no overlap; the wait is then the whole read).
    """

    def __init__(self, read: Callable[[int], dict[str, np.ndarray]], steps: range, depth: int, pin: bool = False):
        self.read, self.steps, self.depth, self.pin = read, iter(steps), depth, pin
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.thread = None
        if depth > 0:
            self.thread = threading.Thread(target=self._fill, name="cptflow-prefetch", daemon=True)
            self.thread.start()

    def _load(self, i: int) -> dict[str, Any]:
        raw = self.read(i)
        out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in raw.items() if isinstance(v, np.ndarray)}
        if self.pin:
            out = {k: v.pin_memory() for k, v in out.items()}
        out["real_tokens"], out["targets"] = real_tokens(raw), count_targets(raw["labels"])
        out.update({k: v for k, v in raw.items() if not isinstance(v, np.ndarray)})
        return out

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():  # never block for good: close() must be able to end the thread
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for i in self.steps:
                if not self._put(self._load(i)):
                    return
        except BaseException as e:  # hand the error to the loop, which re-raises it
            self._put(e)

    def get(self) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        item = self.queue.get() if self.thread is not None else self._load(next(self.steps))
        if isinstance(item, BaseException):
            raise item
        return item, time.perf_counter() - t0

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
