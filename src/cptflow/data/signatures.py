"""The run's signature files as one corpus, read memory-mapped a piece at a time (bands and clusters).

Documents are numbered by their position when the files are concatenated in the order given (the
workflow's input order: sources as configured, files by name, lines in order). Each read maps one
member of one file (``npzio.mmap_npz``), copies what it needs and unmaps it again, so the pages a
job has touched leave its RSS and its memory stays bounded by the largest file, not by the corpus.
``MemorySignatures`` offers the same reads over arrays in memory (tests, the pure ``find_pairs``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from cptflow.core.io import PathLike
from cptflow.data.minhash import DedupConfig
from cptflow.data.npzio import mmap_npz


class Signatures(ABC):
    """Reads over the documents of a corpus: ``counts`` per file, ``offsets`` of each file's first document."""

    counts: list[int]
    has_exact: bool

    @property
    def n(self) -> int:
        return int(sum(self.counts))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    @abstractmethod
    def band_window(self, f: int, band: int, rows: int, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, rows) uint32: the band's values of documents lo..hi of file f."""

    @abstractmethod
    def exact_window(self, f: int, lo: int, hi: int) -> np.ndarray:
        """(hi - lo,) uint64: the exact hashes of documents lo..hi of file f."""

    @abstractmethod
    def member(self, key: str, docs: np.ndarray) -> np.ndarray:
        """Member ``key`` ("sig" as (len(docs), P), "exact", "ids", "chars") of sorted global document indices."""

    def gather(self, docs: np.ndarray) -> np.ndarray:
        return self.member("sig", docs)

    def _split(self, docs: np.ndarray) -> list[tuple[int, np.ndarray, slice]]:
        """(file, local indices, slice of docs) for each file holding some of the sorted ``docs``."""
        cut = np.searchsorted(docs, self.offsets)
        return [(f, docs[cut[f]:cut[f + 1]] - self.offsets[f], slice(cut[f], cut[f + 1]))
                for f in range(len(self.counts)) if cut[f + 1] > cut[f]]


class FileSignatures(Signatures):
    """Signature files (``cptflow.data.signature``), checked to have been made with this config."""

    def __init__(self, paths: Sequence[PathLike], cfg: DedupConfig):
        self.paths = [str(p) for p in paths]
        want = cfg.signature_params_json()
        self.counts = []
        for p in self.paths:
            got = str(np.load(p, allow_pickle=False)["params"])
            if got != want:
                raise ValueError(f"{p}: signatures were made with {got}, but the config says {want}; "
                                 "rerun the signature stage")
            self.counts.append(int(mmap_npz(p, "exact").shape[0]))
        self.has_exact = True
        self.num_perm = cfg.num_perm

    def band_window(self, f: int, band: int, rows: int, lo: int, hi: int) -> np.ndarray:
        sig = mmap_npz(self.paths[f], "sig")
        out = np.ascontiguousarray(sig[band * rows:(band + 1) * rows, lo:hi].T)
        del sig  # unmap
        return out

    def exact_window(self, f: int, lo: int, hi: int) -> np.ndarray:
        exact = mmap_npz(self.paths[f], "exact")
        out = np.array(exact[lo:hi])
        del exact
        return out

    def member(self, key: str, docs: np.ndarray) -> np.ndarray:
        docs = np.asarray(docs, np.int64)
        parts = []
        for f, local, _ in self._split(docs):
            arr = mmap_npz(self.paths[f], key)
            parts.append(np.ascontiguousarray(arr[:, local].T) if key == "sig" else np.array(arr[local]))
            del arr
        if parts:
            return np.concatenate(parts)
        return np.zeros((0, self.num_perm), np.uint32) if key == "sig" else np.zeros(0)


class MemorySignatures(Signatures):
    """One in-memory "file": ``sig`` (n, P) document-major, ``exact`` (n,) or None."""

    def __init__(self, sig: np.ndarray, exact: np.ndarray | None = None):
        self.sig, self.exact = sig, exact
        self.counts = [len(sig)]
        self.has_exact = exact is not None

    def band_window(self, f: int, band: int, rows: int, lo: int, hi: int) -> np.ndarray:
        return np.ascontiguousarray(self.sig[lo:hi, band * rows:(band + 1) * rows])

    def exact_window(self, f: int, lo: int, hi: int) -> np.ndarray:
        assert self.exact is not None
        return self.exact[lo:hi]

    def member(self, key: str, docs: np.ndarray) -> np.ndarray:
        if key != "sig":
            raise KeyError(key)
        return self.sig[np.asarray(docs, np.int64)]
