"""The packed format: token rows on disk that training memory-maps (written by ``pack_shard``, indexed by ``pack``).

A **shard** (one per input file: ``pack_shard``; or any rows built elsewhere: ``write_rows``) is a
directory of plain ``.npy`` arrays, so ``np.load(..., mmap_mode="r")`` opens each without reading it:

* ``tokens.npy``  ``[rows * max_length]`` token ids, uint16 when every id of the tokenizer fits
  (ids 0..65535, i.e. at most 65,536 ids: SmolLM2 + 16k new tokens), else uint32. Row r is
  ``tokens[r * L:(r + 1) * L]``: 2 or 4 bytes per token, against 11.5 for the int32 ``input_ids`` +
  ``labels`` + ``position_ids`` arrow columns it replaces.
* ``starts.npy``  ascending offsets into ``tokens`` where a document (for SFT, a conversation) begins;
  uint32, or int64 past 2^32 tokens.
* ``real.npy``    ``[rows]`` int32: tokens before the padding of each row (max_length but for a padded row).
* ``loss_mask.npy`` (optional) ``np.packbits`` of a 0/1 target per token. Absent (CPT): every real
  token is a target. SFT writes 1 on assistant tokens only.
* ``meta.json``   format name and version, max_length, dtype, rows, category, counts.

Nothing else is stored: at load, ``position_ids`` restart at 0 at every document start, at every row
start (a document split over rows continues from 0: with RoPE only differences matter, and
attention never crosses a row) and at the padding (its own segment); ``labels`` are the ids where a
token is real (and on the mask), -100 elsewhere. These are exactly the arrays the former arrow
columns held.

An **index** (``pack``'s output, what training opens) is the sample order over shards, without a
copy of any token: ``index.json`` (format, max_length, dtype, category names, and per shard its path
relative to the index, rows, and the size and sha256 of its tokens) and four arrays, one entry per
sample in bucket order: ``sample_shard`` (uint32), ``sample_row`` (uint32), ``bucket`` (int32) and
``category`` (uint16 codes into the names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.core.io import PathLike, dumps_json, sha256_file

FORMAT, VERSION = "cptflow-packed", 1
INDEX_FORMAT = "cptflow-packed-index"
IGNORE_INDEX = -100  # = cptflow.model.modeling.IGNORE_INDEX, the label the loss skips
UINT16_MAX_ID = 65535  # the largest id uint16 holds: a vocabulary of up to 65,536 ids
SHARD_FILES = ("meta.json", "real.npy", "starts.npy", "tokens.npy")
INDEX_ARRAYS = ("sample_shard", "sample_row", "bucket", "category")


def token_dtype(max_id: int) -> np.dtype:
    """uint16 when ids 0..max_id all fit in 2 bytes, else uint32."""
    if max_id < 0 or max_id >= 2**32:
        raise ValueError(f"token id {max_id} does not fit 4 bytes")
    return np.dtype(np.uint16) if max_id <= UINT16_MAX_ID else np.dtype(np.uint32)


class NpyAppender:
    """A 1-D ``.npy`` written piece by piece: the header (a fixed 128 bytes) gets the length at close."""

    def __init__(self, path: PathLike, dtype: np.dtype):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), 0
        self.f = open(self.path, "wb")
        self.header_bytes = self._header(0)

    def _header(self, n: int) -> int:
        self.f.seek(0)
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": (n,)})
        return self.f.tell()

    def append(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.n += len(arr)

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` items."""
        self.f.truncate(self.header_bytes + n * self.dtype.itemsize)
        self.f.seek(0, os.SEEK_END)
        self.n = n

    def close(self) -> int:
        if self._header(self.n) != self.header_bytes:  # never for 1-D shapes below 10^50 items
            raise RuntimeError(f"{self.path}: .npy header changed size")
        self.f.close()
        return self.n


def starts_dtype(total_tokens: int) -> np.dtype:
    return np.dtype(np.uint32) if total_tokens < 2**32 else np.dtype(np.int64)


def write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    (out_dir / "meta.json").write_text(dumps_json({"format": FORMAT, "version": VERSION, **meta}), encoding="utf-8")


def write_rows(out_dir: PathLike, ids: np.ndarray, starts: np.ndarray, real: np.ndarray,
               loss_mask: np.ndarray | None = None, meta: dict[str, Any] | None = None) -> None:
    """A shard of rows built in memory (SFT's whole conversations, with padding at each row's end).

    ``ids`` [rows, L] (any integer type; stored as ``token_dtype`` of its largest id unless meta
    names a ``dtype``), ``starts`` offsets into ``ids.reshape(-1)`` where a segment (conversation)
    begins, ``real`` [rows] tokens before each row's padding, ``loss_mask`` [rows, L] 0/1 or None.
    """
    out, meta = Path(out_dir), dict(meta or {})
    out.mkdir(parents=True, exist_ok=True)
    rows, length = ids.shape
    dtype = np.dtype(meta.pop("dtype", None) or token_dtype(int(ids.max(initial=0))))
    np.save(out / "tokens.npy", ids.reshape(-1).astype(dtype))
    np.save(out / "starts.npy", np.asarray(starts).astype(starts_dtype(ids.size)))
    np.save(out / "real.npy", np.asarray(real, np.int32))
    if loss_mask is not None:
        np.save(out / "loss_mask.npy", np.packbits(np.asarray(loss_mask, bool).reshape(-1)))
    write_meta(out, {"max_length": int(length), "dtype": dtype.name, "rows": int(rows), **meta})


def read_meta(shard_dir: PathLike) -> dict[str, Any]:
    """meta.json of a shard, checked to be this format."""
    path = Path(shard_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a packed shard ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}; rerun pack_shard")
    return meta


def write_index(out_dir: PathLike, shards: Sequence[dict[str, Any]], names: Sequence[str], max_length: int,
                dtype: str, sample_shard: np.ndarray, sample_row: np.ndarray, bucket: np.ndarray,
                category: np.ndarray, extra: dict[str, Any] | None = None) -> None:
    """The training data directory: ``shards`` [{path (relative to out_dir), rows, ...}] and the sample order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"sample_shard": np.asarray(sample_shard, np.uint32), "sample_row": np.asarray(sample_row, np.uint32),
              "bucket": np.asarray(bucket, np.int32), "category": np.asarray(category, np.uint16)}
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    index = {"format": INDEX_FORMAT, "version": VERSION, "max_length": int(max_length), "dtype": dtype,
             "categories": list(names), "samples": int(len(arrays["bucket"])), "shards": list(shards),
             **(extra or {})}
    (out / "index.json").write_text(dumps_json(index), encoding="utf-8")


def write_dataset(out_dir: PathLike, ids: np.ndarray, starts: np.ndarray, real: np.ndarray,
                  categories: Sequence[str], buckets: np.ndarray, loss_mask: np.ndarray | None = None) -> None:
    """Rows built in memory as one ready-to-train directory: one shard inside it plus the index, samples in row order.

    For data that needs no mixing (SFT conversations, tests). ``categories`` and ``buckets`` give each
    row's; rows must already be sorted by bucket. See ``write_rows`` for the other arguments.
    """
    out = Path(out_dir)
    write_rows(out / "shard-00000", ids, starts, real, loss_mask)
    names = sorted(set(categories))
    tokens = out / "shard-00000" / "tokens.npy"
    ref = {"path": "shard-00000", "rows": int(ids.shape[0]), "category": ",".join(names),
           "tokens_bytes": tokens.stat().st_size, "tokens_sha256": sha256_file(tokens)}
    write_index(out, [ref], names, ids.shape[1], read_meta(out / "shard-00000")["dtype"],
                np.zeros(len(ids), np.int64), np.arange(len(ids)), np.asarray(buckets),
                np.array([names.index(c) for c in categories], np.int64))
