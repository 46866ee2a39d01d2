"""safetensors headers without torch: parse, check, and index a model directory's tensors.

A safetensors file is ``<u64 header length><JSON header><tensor bytes>``. Everything here reads only the
header, so it is cheap on a multi-GB model and imports neither torch nor safetensors: Snakemake's
resource functions (cptflow.model.sizing) and the workflow-start check of ``base_model.path`` use it
while planning the DAG. Headers are checked to tile the data without gaps, so a truncated or
padded-out file is an error that names it. ``safetensors_io`` (the streaming reader/writer) builds on it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from cptflow.core.io import PathLike, read_json

#: Bytes per element of every safetensors dtype.
ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
            "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
#: The float dtypes a trainable base may be stored in, with their torch / config names.
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class StTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class StFile:
    path: Path
    header: bytes  # the raw JSON header, padding included
    tensors: tuple[StTensor, ...]  # in data order


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = ST_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def parse_header(raw: bytes, where: str) -> tuple[StTensor, ...]:
    """Tensor entries of a raw safetensors header, in data order; offsets must tile the data without gaps."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a safetensors file (header is not JSON: {e})") from e
    try:
        tensors = sorted((StTensor(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"])
                          for k, v in obj.items() if k != "__metadata__"), key=lambda t: (t.begin, t.end))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: malformed safetensors header ({e!r})") from e
    pos = 0
    for t in tensors:
        if t.begin != pos or t.dtype not in ST_SIZES or t.end - t.begin != nbytes(t.shape, t.dtype):
            raise ValueError(f"{where}: tensor {t.name}: bad dtype, shape or data offsets {t.begin}..{t.end}")
        pos = t.end
    return tuple(tensors)


def read_header(path: PathLike) -> StFile:
    """Parse and check a safetensors header; a truncated or padded-out file is an error naming it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        raw = f.read(n)
    tensors = parse_header(raw, str(path))
    data = tensors[-1].end if tensors else 0
    if 8 + n + data != size:
        what = "truncated safetensors file" if 8 + n + data > size else "trailing bytes after the tensors"
        raise ValueError(f"{path}: {what} (expected {8 + n + data} bytes, found {size})")
    return StFile(path, raw, tensors)


def model_files(model_dir: PathLike) -> list[str]:
    """Relative paths of a model directory's files, sorted; hidden files (.cache/, .git*) are not the model."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def weight_files(model_dir: PathLike) -> list[str]:
    """Safetensors files of a model; every shard the index names must exist."""
    root = Path(model_dir)
    files = [f for f in model_files(root) if f.endswith(".safetensors")]
    for idx in (f for f in model_files(root) if f.endswith(".safetensors.index.json")):
        for shard in sorted(set(read_json(root / idx)["weight_map"].values())):
            if shard not in files:
                raise FileNotFoundError(f"{root / shard}: shard named in {idx} is missing")
    if not files:
        raise ValueError(f"{root}: no *.safetensors weights (convert .bin checkpoints with save_pretrained first)")
    return files


def tensor_index(model_dir: PathLike) -> dict[str, tuple[Path, StTensor]]:
    """Tensor name → (file, header entry) over all shards of a model."""
    out: dict[str, tuple[Path, StTensor]] = {}
    for rel in weight_files(model_dir):
        st = read_header(Path(model_dir) / rel)
        for t in st.tensors:
            if t.name in out:
                raise ValueError(f"{model_dir}: tensor {t.name} is in both {out[t.name][0].name} and {rel}")
            out[t.name] = (st.path, t)
    return out


def stored_float_dtype(tensors: list[StTensor] | tuple[StTensor, ...], where: str) -> str:
    """The float dtype holding most of a model's bytes ("bfloat16", ...): the dtype outputs keep.

    Integer or 8-bit float tensors carrying most of the weight mean a quantized checkpoint (GPTQ, AWQ,
    FP8), which continual pre-training cannot start from: that is an error naming the model.
    """
    by_dtype: dict[str, int] = {}
    for t in tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.end - t.begin
    if not by_dtype:
        raise ValueError(f"{where}: the safetensors files hold no tensors")
    main = max(sorted(by_dtype), key=lambda k: by_dtype[k])
    if main not in FLOAT_DTYPES:
        raise ValueError(f"{where}: most weights are stored as {main}: a quantized checkpoint; cptflow trains from "
                         f"float32/bfloat16/float16 weights (use the unquantized base, or a .gguf file to dequantize)")
    return FLOAT_DTYPES[main]
