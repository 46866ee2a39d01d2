"""Tokenizing one shard's documents and splicing them into fixed-length rows (the core of ``pack_shard``).

The shard's documents (row order) become BOS + ids + EOS (both configurable) and are concatenated
greedily into rows of ``max_length`` tokens, so no token is wasted on padding except in the shard's
last row. A document longer than the room left is split and continues in the next row. The stream
is written as it is made (``ShardWriter``): memory holds one batch of documents, never the shard.
What the rows look like on disk, and the position ids and labels training derives from them, is
``cptflow.pack.packed``. The last partial row is padded (with ``pad_token_id``, default EOS) or
dropped (``tail``), and counted either way: at most one row per shard.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.core.io import PathLike
from cptflow.pack.packed import NpyAppender, starts_dtype, write_meta


def read_batches(path: PathLike, batch_docs: int) -> Iterator[list[str]]:
    """The ``text`` column of one parquet shard, ``batch_docs`` at a time; a null text names its row."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if "text" not in names:
        raise ValueError(f"{path}: no 'text' column (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=batch_docs):
        texts = batch.column(0).to_pylist()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"{path}: row {row + i}: 'text' is {type(t).__name__}, not a string")
        row += len(texts)
        yield texts


def tokenize(backend: Any, texts: Sequence[str], batch_docs: int) -> list[np.ndarray]:
    """Token ids per document, through the Rust ``encode_batch_fast`` (3-5x ``tok(list)``).

    ``backend`` is a ``tokenizers.Tokenizer`` that encodes special-token strings as text
    (``cptflow.pack.encoder.load_encoder``, ``cptflow.model.hf.raw_text_encoder``).
    """
    out: list[np.ndarray] = []
    for i in range(0, len(texts), batch_docs):
        for enc in backend.encode_batch_fast(list(texts[i: i + batch_docs]), add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=np.int32))
    return out


def encoded_batches(backend: Any, path: PathLike, batch_docs: int) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """(texts, token ids) per batch of the shard, the next batch read and encoded one step ahead.

    A background thread reads and encodes batch i+1 (the Rust encoder releases the GIL) while the caller
    splices and writes batch i, so the single-threaded splicing overlaps the encoding instead of following
    it. Memory stays at about two batches; order and output are those of the plain loop; an error in the
    thread (a bad row) is raised here, in order, after the batches before it.
    """
    q: queue.Queue = queue.Queue(maxsize=1)
    stop, end = threading.Event(), object()

    def put(item: Any) -> bool:
        while not stop.is_set():  # never block for good: the caller may stop early
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for texts in read_batches(path, batch_docs):
                if not put((texts, tokenize(backend, texts, batch_docs))):
                    return
            put(end)
        except BaseException as e:  # handed to the caller, which re-raises it
            put(e)

    thread = threading.Thread(target=fill, name="cptflow-pack-encode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class ShardWriter:
    """Splices documents greedily into rows of ``max_length`` tokens, streaming them to ``out_dir``.

    Memory is one batch of documents plus one int per document (its start), whatever the shard size.
    The last partial row is padded with ``pad_id`` (``tail="pad"``) or dropped (``"drop"``), and
    counted either way.
    """

    def __init__(self, out_dir: PathLike, max_length: int, dtype: np.dtype, pad_id: int, tail: str,
                 bos: int | None, eos: int | None):
        self.dir, self.length, self.pad_id, self.tail = Path(out_dir), int(max_length), int(pad_id), tail
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.pre = [np.array([bos], self.dtype)] if bos is not None else []
        self.post = [np.array([eos], self.dtype)] if eos is not None else []
        self.tokens = NpyAppender(self.dir / "tokens.npy", self.dtype)
        self.starts: list[np.ndarray] = []
        self.total = self.docs = self.split = self.doc_tokens = 0

    def add(self, docs: Sequence[np.ndarray]) -> None:
        """Append documents (token ids without BOS/EOS, which are added here) in order."""
        if not docs:
            return
        lens = np.fromiter((len(d) for d in docs), np.int64, len(docs)) + len(self.pre) + len(self.post)
        starts = self.total + np.cumsum(lens) - lens
        self.starts.append(starts)
        self.split += int(np.sum((starts + lens - 1) // self.length > starts // self.length))
        self.tokens.append(np.concatenate([p for d in docs for p in (*self.pre, d, *self.post)]))
        self.total += int(lens.sum())
        self.doc_tokens += int(lens.sum()) - len(docs) * (len(self.pre) + len(self.post))
        self.docs += len(docs)

    def finish(self, meta: dict[str, Any]) -> dict[str, int]:
        """Pad or drop the tail, write starts/real/meta; return the counts (also in meta.json)."""
        full, rem = divmod(self.total, self.length)
        pad = self.length - rem if rem and self.tail == "pad" else 0
        keep = self.total if self.tail == "pad" else full * self.length
        if pad:
            self.tokens.append(np.full(pad, self.pad_id, self.dtype))
        elif keep < self.total:
            self.tokens.truncate(keep)
        self.tokens.close()
        starts = np.concatenate(self.starts) if self.starts else np.zeros(0, np.int64)
        rows = (keep + pad) // self.length
        real = np.full(rows, self.length, np.int32)
        if pad:
            real[-1] = rem
        np.save(self.dir / "starts.npy", starts[starts < keep].astype(starts_dtype(keep + pad)))
        np.save(self.dir / "real.npy", real)
        counts = {"docs": self.docs, "doc_tokens": self.doc_tokens, "stream_tokens": self.total, "docs_split": self.split, "rows_packed": rows,
                  "tail_tokens_dropped": self.total - keep, "padding_tokens": pad}
        write_meta(self.dir, {"max_length": self.length, "dtype": self.dtype.name, "rows": rows,
                               "counts": counts, **meta})
        return counts
