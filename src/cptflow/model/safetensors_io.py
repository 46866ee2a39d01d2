"""Streaming safetensors files tensor by tensor: tensors read one at a time, files written raw.

Working at the byte level lets the release stages (and model intake) handle multi-GB models with the
memory of one tensor: a tensor is read through ``safe_open`` with the file opened per call, so no mmap
keeps a whole shard resident, and written straight to the output at the offsets its header gives.
Header parsing and checking (a truncated or padded-out file is an error that names it) lives in the
torch-free ``cptflow.model.safetensors_header``.
"""

from __future__ import annotations

import json
import resource
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

# Header parsing is torch-free (the workflow plans with it); re-exported here for the release stages.
from cptflow.model.safetensors_header import (  # noqa: F401
    ST_SIZES, StFile, StTensor, model_files, nbytes, parse_header, read_header, tensor_index, weight_files,
)


ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
             "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
             "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor; opening the file per call lets its pages go when the tensor is dropped."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def write_tensor_bytes(f: Any, t: torch.Tensor, expected: int, where: str) -> None:
    if sys.byteorder != "little":  # safetensors data is little-endian; torch bytes follow the host
        raise ValueError("delta: big-endian hosts are not supported")
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    if data.nbytes != expected:
        raise ValueError(f"{where}: tensor has {data.nbytes} bytes, the layout says {expected}")
    f.write(data.data)


def plan_shards(entries: list[tuple[str, int]], max_bytes: int, stem: str) -> list[tuple[str, list[str]]]:
    """Greedy split of (name, bytes) in order into files of at most ``max_bytes`` (a larger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, n in entries:
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    return [(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def st_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Header bytes for (name, dtype, shape, nbytes) in data order, padded to 8 bytes as safetensors does."""
    obj: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, dtype, shape, n in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_st(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str],
              produce: Any) -> None:
    """Stream a safetensors file: header first, then ``produce(name)`` tensor by tensor."""
    hdr = st_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for name, _, _, n in entries:
            write_tensor_bytes(f, produce(name), n, f"{path.name}:{name}")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
