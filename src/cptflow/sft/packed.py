"""The SFT packed data: conversations placed whole into fixed-length rows, with a loss mask. Written by
``sft_pack``, read by ``finetune`` — the one module that knows how, so a change of the training
stage's packed format stays here.

Conversations are never split across rows (a reply must see its question), so they are placed
whole, best-fit decreasing: longest first, each into the fullest row it still fits, which leaves
little padding whatever the length mix (``plan_rows``). A row is described, as issue #10's packed
format describes it, by its token ids, the offsets where each conversation starts (``starts``), its
real length before the padding and a 0/1 loss mask (``build_rows``).

On disk it is the training stage's packed format (``cptflow.pack.packed.write_dataset``: one shard of
token ids, conversation ``starts``, ``real`` lengths and the packed ``loss_mask``, plus the index),
so ``finetune`` reads it with the training stage's own reader, sample order and prefetcher: labels
are the ids on the mask (-100 elsewhere: the loss is the training stage's, unchanged) and position
ids restart at every conversation start and at the padding, which is what keeps attention inside
a conversation (``cptflow.train.attention``). The ids of the conversations in each row go to
``conversations.json`` beside it, for the report and the tests.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.core.io import read_json, sha256_path, write_json
from cptflow.pack.packed import write_dataset
from cptflow.pack.packed_reader import PackedData
from cptflow.train import data as train_data

FORMAT_VERSION = 3  # 3: the training stage's memory-mapped shards + index, the mask packed (issue #10)
CATEGORY = "sft"  # every row's category: the training reader wants one
MEMBERS = "conversations.json"  # the ids of the conversations of each row


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: which conversation indices go into which row (deterministic, O(n log n))."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, row) of rows with room, sorted
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if not 0 < need <= capacity:
            raise ValueError(f"conversation {i}: {need} tokens does not fit a row of {capacity}")
        j = bisect.bisect_left(free, (need, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, r))
    return rows


def build_rows(ids: Sequence[np.ndarray], masks: Sequence[np.ndarray], plan: list[list[int]], capacity: int,
               pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [rows, capacity], loss mask uint8 [rows, capacity], real int32 [rows], starts int64).

    ``starts`` are the offsets into ``ids.reshape(-1)`` where a conversation begins (ascending).
    """
    out_ids = np.full((len(plan), capacity), pad_id, dtype=np.int32)
    out_mask = np.zeros((len(plan), capacity), dtype=np.uint8)
    real = np.zeros(len(plan), dtype=np.int32)
    starts = []
    for r, members in enumerate(plan):
        at = 0
        for i in members:
            n = len(ids[i])
            out_ids[r, at: at + n] = ids[i]
            out_mask[r, at: at + n] = masks[i]
            starts.append(r * capacity + at)
            at += n
        real[r] = at
    return out_ids, out_mask, real, np.asarray(starts, dtype=np.int64)


def write(out_dir: str | Path, ids: np.ndarray, mask: np.ndarray, real: np.ndarray, starts: np.ndarray,
          members: list[list[str]]) -> str:
    """Write the rows as the training stage's packed data (byte-identical for identical rows); its sha256."""
    out = Path(out_dir)
    write_dataset(out, ids, starts, real, [CATEGORY] * len(ids), np.zeros(len(ids), np.int32), loss_mask=mask)
    write_json(out / MEMBERS, members)
    return sha256_path(out)


def open_rows(data_dir: str | Path) -> tuple[PackedData, int]:
    """The packed rows (memory-mapped, the training stage's reader) and the row length."""
    if not (Path(data_dir) / MEMBERS).is_file():
        raise ValueError(f"{data_dir}: no {MEMBERS}; not sft_pack output")
    return train_data.open_dataset(data_dir)


def load_rows(ds: PackedData, row_ids: np.ndarray, length: int, where: str = "data") -> dict[str, np.ndarray]:
    """input_ids, labels (-100 off the mask), position_ids as int64 [n, length], and ``real`` [n]."""
    return train_data.load_rows(ds, row_ids, length, where)


def read_batch(ds: PackedData, order: Any, offset: int, global_batch: int, rank: int, world_size: int, length: int,
               where: str = "data") -> dict[str, np.ndarray]:
    """This rank's share of the global batch at sample ``offset`` (``cptflow.train.data.read_batch``)."""
    return train_data.read_batch(ds, order, offset, global_batch, rank, world_size, length, where)


def row_members(ds: PackedData, row_ids: np.ndarray) -> list[list[str]]:
    """Ids of the conversations in each row, in order (samples are the rows, in row order)."""
    members = read_json(ds.dir / MEMBERS)
    return [members[int(ds.sample_row[r])] for r in np.asarray(row_ids, dtype=np.int64)]
