"""Byte-deterministic .npz files (signatures, pairs, the decontamination index).

``np.savez`` stamps every member with the current time, so two runs on the same input give different
bytes and a checksum-based "unchanged?" test fails. Here every member gets the fixed zip epoch
(1980-01-01) and fixed permissions, members are written in sorted name order, uncompressed, and the
file goes through ``atomic_path``. ``np.load`` reads the result as any .npz.

Because members are stored uncompressed, one member can be memory-mapped in place
(``mmap_npz``): a bands job maps the signature matrix and touches only its own band's rows.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from cptflow.core.io import PathLike, atomic_path

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


def mmap_npz(path: PathLike, key: str) -> np.ndarray:
    """Member ``key`` of an uncompressed .npz as a read-only memory map (nothing is read until used).

    The member's bytes start after its zip local header (30 bytes + name + extra field), then the
    .npy header; ``np.memmap`` maps from there. Delete the array to unmap it (its pages leave RSS).
    """
    name = f"{key}.npy"
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise ValueError(f"{path}: not a file of the expected kind (missing {key})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: member {name} is compressed; it cannot be memory-mapped")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + n_name + n_extra)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: member {name} holds Python objects")
    if not int(np.prod(shape)):  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
