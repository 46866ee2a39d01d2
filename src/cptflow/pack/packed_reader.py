"""Reading packed data memory-mapped: an index over shards (``cptflow.pack.packed``) as training rows.

``PackedData(index_dir)`` opens ``index.json`` and its four sample arrays (memory-mapped), checks
that every shard it names is there with the size the index recorded (a cheap ``stat``; a truncated
shard is an error naming it), and maps a shard's arrays only when one of its rows is first read.
``take(samples)`` returns what the loss takes, derived from the stored tokens, document starts and
row lengths (see ``cptflow.pack.packed``): ``input_ids``, ``labels`` and ``position_ids`` as int64
``[n, max_length]``, and ``real`` (tokens before padding per row, for tokens/s over real tokens
also when a loss mask leaves part of them out of the loss).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.core.io import PathLike
from cptflow.pack.packed import IGNORE_INDEX, INDEX_ARRAYS, INDEX_FORMAT, VERSION


class Shard:
    """One shard's arrays, memory-mapped on first use."""

    def __init__(self, path: Path, rows: int, length: int, dtype: str):
        self.path, self.rows, self.length, self.dtype = path, rows, length, dtype
        self.arrays: dict[str, np.ndarray] | None = None

    def open(self) -> dict[str, np.ndarray]:
        if self.arrays is None:
            arrays = {k: np.load(self.path / f"{k}.npy", mmap_mode="r") for k in ("tokens", "starts", "real")}
            mask = self.path / "loss_mask.npy"
            if mask.is_file():
                arrays["loss_mask"] = np.load(mask, mmap_mode="r")
            tok = arrays["tokens"]
            if tok.dtype.name != self.dtype or tok.shape != (self.rows * self.length,) or \
                    arrays["real"].shape != (self.rows,):
                raise ValueError(f"{self.path}: tokens {tok.dtype}{list(tok.shape)} / real {list(arrays['real'].shape)}"
                                 f" do not match the index ({self.rows} rows of {self.length} {self.dtype})")
            self.arrays = arrays
        return self.arrays


class PackedData:
    """The training samples of one ``pack`` index: ``n`` samples of ``length`` tokens."""

    def __init__(self, index_dir: PathLike):
        self.dir = Path(index_dir)
        path = self.dir / "index.json"
        try:
            index: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.dir}: not packed data (no index.json; run the pack stage)") from e
        if index.get("format") != INDEX_FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{path}: format {index.get('format')!r} version {index.get('version')!r}, "
                             f"expected {INDEX_FORMAT!r} version {VERSION}; rerun pack")
        self.index, self.length, self.names = index, int(index["max_length"]), list(index["categories"])
        arrays = {k: np.load(self.dir / f"{k}.npy", mmap_mode="r") for k in INDEX_ARRAYS}
        self.sample_shard, self.sample_row = arrays["sample_shard"], arrays["sample_row"]
        self.bucket, self.category = arrays["bucket"], arrays["category"]
        self.n = int(index["samples"])
        if any(len(a) != self.n for a in arrays.values()):
            raise ValueError(f"{self.dir}: the sample arrays do not all have {self.n} entries")
        self.shards = []
        for s in index["shards"]:
            shard_dir = (self.dir / s["path"]).resolve()
            tokens = shard_dir / "tokens.npy"
            size = tokens.stat().st_size if tokens.is_file() else None
            if size != s["tokens_bytes"]:
                raise ValueError(f"{tokens}: {'missing' if size is None else f'{size} bytes'}, the index recorded "
                                 f"{s['tokens_bytes']}; the shard changed after pack indexed it: rerun the workflow")
            self.shards.append(Shard(shard_dir, int(s["rows"]), self.length, index["dtype"]))

    def __len__(self) -> int:
        return self.n

    def take(self, samples: np.ndarray, where: str = "data") -> dict[str, np.ndarray]:
        """input_ids, labels, position_ids (int64 [n, length]) and real (int64 [n]) of the given samples."""
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size and (samples.min() < 0 or samples.max() >= self.n):
            raise ValueError(f"{where}: sample ids outside 0..{self.n - 1}")
        n, L = len(samples), self.length
        ids = np.empty((n, L), np.int64)
        target = np.ones((n, L), bool)
        seg = np.zeros((n, L), bool)
        real = np.empty(n, np.int64)
        for i, sample in enumerate(samples):
            shard = self.shards[int(self.sample_shard[sample])]
            row = int(self.sample_row[sample])
            a = shard.open()
            lo, hi = row * L, (row + 1) * L
            ids[i] = a["tokens"][lo:hi]
            real[i] = int(a["real"][row])
            st = a["starts"]
            seg[i, np.asarray(st[np.searchsorted(st, lo): np.searchsorted(st, hi)], np.int64) - lo] = True
            if real[i] < L:
                seg[i, real[i]] = True  # the padding is a segment of its own
            if "loss_mask" in a:  # bits lo..hi of the packed mask
                bits = np.unpackbits(a["loss_mask"][lo // 8: (hi + 7) // 8])
                target[i] = bits[lo % 8: lo % 8 + L].astype(bool)
        seg[:, 0] = True  # every row starts a segment
        col = np.arange(L)
        pos = col - np.maximum.accumulate(np.where(seg, col, 0), axis=1)
        labels = np.where(target & (col < real[:, None]), ids, IGNORE_INDEX)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "real": real}
