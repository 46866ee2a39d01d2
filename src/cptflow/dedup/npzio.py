"""Byte-deterministic .npz files (signatures, pairs, the decontamination index).

``np.savez`` stamps every member with the current time, so two runs on the same input give different
bytes and a checksum-based "unchanged?" test fails. Here every member gets the fixed zip epoch
(1980-01-01) and fixed permissions, members are written in sorted name order, uncompressed, and the
file goes through ``atomic_path``. ``np.load`` reads the result as any .npz.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from cptflow.io import PathLike, atomic_path

_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed .npz whose bytes depend only on the data."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            arr = np.asarray(arrays[name])
            if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scalar into 1-d)
                arr = arr.copy(order="C")
            if arr.dtype == object:
                raise ValueError(f"{path}: array {name!r} has dtype object; refusing to pickle")
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)


def read_npz(path: PathLike, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Load ``keys`` from an .npz; a missing key is an error naming the file (wrong or stale input)."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a file of the expected kind (missing {', '.join(missing)})")
        return {k: z[k] for k in keys}
