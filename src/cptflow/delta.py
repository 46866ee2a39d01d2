"""Release stage: a weight delta of the adapted model against its public base, and its inverse.

LLaMA-derived weights are often not ours to redistribute, so we publish ``delta = adapted ⊖ base``;
a user who holds the base rebuilds the adapted model with ``apply``, and the DESIGN invariant says
``apply(base, make(base, adapted)) == adapted`` byte for byte, proven by sha256.

Numeric scheme — XOR of bit patterns. A float difference (``adapted - base`` in bf16/fp16, even in
fp32) is rounded, so ``base + (adapted - base)`` does not give ``adapted`` back. We view both tensors
as unsigned/signed integers of the same width (bf16/fp16 → int16, fp32 → int32, fp64 → int64, 1-byte
types → uint8) and store ``adapted_bits XOR base_bits``. XOR is defined for every width with no
overflow semantics to rely on (an integer difference would need wrap-around), is its own inverse,
and for weights that moved a little it keeps sign, exponent and high mantissa bits at zero, so the
delta compresses well. Rows the base lacks (embed_tokens / lm_head rows of the expanded vocabulary,
or whole tensors the base does not have) are XORed with nothing, i.e. stored whole. When the base
tensor has another dtype than the adapted one it is first cast to the adapted dtype (deterministic).

Byte identity of the files: a safetensors file is ``<u64 header length><JSON header><tensor bytes>``;
its bytes depend on the header's key order, metadata and padding, which differ between writers. We
store each adapted shard's raw header verbatim (``layout/<shard>.header``) and write tensor bytes at
its offsets, so the output does not depend on the safetensors version. Every other file of the
adapted directory (config, tokenizer, index) is copied as is. ``manifest.json`` holds the sha256 of
every adapted file and of the base's files; apply refuses a base whose weight files differ and
checks every output file before renaming the directory into place.

Memory: tensors are read one at a time through ``safetensors.safe_open``, opening the file per
tensor so that no mmap keeps a whole shard resident, and written straight to the output; peak
memory is about three copies of the largest tensor, not two models.

``apply --format fastchat`` applies public FastChat/Fengshenbang deltas: plain float arithmetic
``base + delta`` (computed in fp32, written in ``fastchat_dtype``); a delta with more embedding rows
than the base keeps its extra rows as they are. Such outputs are not bit-exact by nature.

Delta directory: ``manifest.json``, ``delta.safetensors.index.json``, ``delta-0000i-of-0000n.safetensors``
(integer tensors named as the adapted ones), the adapted model's config/tokenizer files, ``layout/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cptflow.cli import stage_main
from cptflow.config import ConfigError, from_dict, to_dict
from cptflow.io import PathLike, atomic_path, read_json, sha256_file, write_json
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
FORMAT = "cptflow-delta"
SCHEME = "xor-bits"
MANIFEST = "manifest.json"
DELTA_INDEX = "delta.safetensors.index.json"
LAYOUT = "layout"
log = logging.getLogger("cptflow.delta")

ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
             "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
             "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
BIT_TYPES = {1: "U8", 2: "I16", 4: "I32", 8: "I64"}  # same-width integer views for XOR


@dataclass(frozen=True)
class DeltaConfig:
    max_shard_mb: int = 5000  # largest delta (or fastchat output) shard, MB of 10^6 bytes as Hugging Face counts
    verify_base: bool = True  # apply: compare the base's weight files with the sha256 in the manifest first
    fastchat_dtype: str = "float16"  # apply --format fastchat: dtype of the written weights (float16|bfloat16|float32)

    def __post_init__(self) -> None:
        if self.max_shard_mb < 1:
            raise ConfigError("delta.max_shard_mb must be >= 1")
        if self.fastchat_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"delta.fastchat_dtype {self.fastchat_dtype!r}: use float16, bfloat16 or float32")


@dataclass(frozen=True)
class StTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class StFile:
    path: Path
    header: bytes  # the raw JSON header, padding included
    tensors: tuple[StTensor, ...]  # in data order


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
        if t.begin != pos or t.dtype not in ST_DTYPES or t.end - t.begin != _nbytes(t.shape, t.dtype):
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


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The same bytes viewed as an integer type of the same width."""
    return t.contiguous().view(ST_DTYPES[BIT_TYPES[t.element_size()]])


def xor_bits(x_bits: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x_bits`` XOR the bits of ``base`` cast to ``dtype``; rows beyond the base's (all, without a base) pass as is.

    Used both ways: make (x = adapted bits → delta) and apply (x = delta → adapted bits).
    """
    if base is None:
        return x_bits.clone()
    bb = bits_of(base.to(dtype))
    if bb.shape == x_bits.shape:
        return torch.bitwise_xor(x_bits, bb)
    out = x_bits.clone()
    out[: bb.shape[0]].bitwise_xor_(bb)  # in place: no fourth tensor-sized temporary
    return out


def check_compatible(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...], where: str) -> None:
    """Same shape, or more rows (expanded vocabulary) with the other dims equal."""
    if shape == base_shape:
        return
    if len(shape) == len(base_shape) >= 1 and shape[1:] == base_shape[1:] and shape[0] > base_shape[0]:
        return
    raise ValueError(f"tensor {name}: shape {list(shape)} does not extend the base's {list(base_shape)} "
                     f"({where}): wrong base model?")


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


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
    for d in shape:
        n *= d
    return n


def digest(file_shas: dict[str, str]) -> str:
    """Directory digest from per-file sha256: ``cptflow.io.sha256_path`` of those files, without reading them again."""
    h = hashlib.sha256()
    for rel in sorted(file_shas):
        h.update(rel.encode() + b"\0" + file_shas[rel].encode())
    return h.hexdigest()


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _stored_name(rel: str) -> str:
    """Where a copied adapted file lives in the delta: top level (config, tokenizer), else under layout/."""
    reserved = (rel in (MANIFEST, DELTA_INDEX, LAYOUT) or rel.startswith("delta")
                or rel.endswith(".safetensors.index.json"))
    return f"{LAYOUT}/files/{rel}" if "/" in rel or reserved else rel


def _write_st(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str],
              produce: Any) -> None:
    """Stream a safetensors file: header first, then ``produce(name)`` tensor by tensor."""
    hdr = st_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for name, _, _, n in entries:
            write_tensor_bytes(f, produce(name), n, f"{path.name}:{name}")


def make(cfg: DeltaConfig, base_dir: PathLike, adapted_dir: PathLike, out_dir: PathLike) -> tuple[Stats, dict, dict]:
    """Write the delta directory; returns stats and the sha256 digests of inputs and outputs."""
    base_dir, adapted_dir, out_dir = Path(base_dir), Path(adapted_dir), Path(out_dir)
    stats = Stats()
    base_idx = tensor_index(base_dir)
    layouts = {rel: read_header(adapted_dir / rel) for rel in weight_files(adapted_dir)}
    tensors: dict[str, dict[str, Any]] = {}
    for rel, st in layouts.items():
        for t in st.tensors:
            if t.name in tensors:
                raise ValueError(f"{adapted_dir}: tensor {t.name} is in both {tensors[t.name]['file']} and {rel}")
            info: dict[str, Any] = {"file": rel, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.end - t.begin}
            if t.name in base_idx:
                bpath, bt = base_idx[t.name]
                check_compatible(t.name, t.shape, bt.shape, f"{adapted_dir / rel} vs {bpath}")
                info.update(base_shape=list(bt.shape), base_dtype=bt.dtype)
                if bt.shape != t.shape:
                    stats.update("tensors_expanded")
                    stats.update("rows_new", t.shape[0] - bt.shape[0])
            else:
                stats.update("tensors_new")
            tensors[t.name] = info
    shards = plan_shards([(n, i["bytes"]) for n, i in tensors.items()], cfg.max_shard_mb * 10**6, "delta")
    adapted_shas = {rel: sha256_file(adapted_dir / rel) for rel in model_files(adapted_dir)}
    base_shas = {rel: sha256_file(base_dir / rel) for rel in model_files(base_dir)}
    weight_map: dict[str, str] = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()

        def produce(name: str) -> torch.Tensor:
            info = tensors[name]
            a = read_tensor(adapted_dir / info["file"], name)
            b = read_tensor(base_idx[name][0], name) if "base_shape" in info else None
            stats.update("tensors")
            stats.update("bytes", info["bytes"])
            return xor_bits(bits_of(a), b, a.dtype)

        for fname, names in shards:
            for n in names:
                tensors[n]["delta_file"] = weight_map[n] = fname
            _write_st(tmp / fname, [(n, BIT_TYPES[_nbytes((), tensors[n]["dtype"])], tuple(tensors[n]["shape"]),
                                     tensors[n]["bytes"]) for n in names], {"format": FORMAT}, produce)
        files: dict[str, dict[str, Any]] = {}
        for rel, sha in adapted_shas.items():
            if rel in layouts:
                dest = f"{LAYOUT}/{rel}.header"
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                (tmp / dest).write_bytes(layouts[rel].header)
                files[rel] = {"kind": "safetensors", "header": dest, "sha256": sha}
            else:
                dest = _stored_name(rel)
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(adapted_dir / rel, tmp / dest)
                files[rel] = {"kind": "copy", "stored_as": dest, "sha256": sha}
                stats.update("files_copied")
        write_json(tmp / DELTA_INDEX, {"metadata": {"total_size": int(stats["bytes"])}, "weight_map": weight_map})
        write_json(tmp / MANIFEST, {
            "format": FORMAT, "version": VERSION, "scheme": SCHEME,
            "adapted": {"files": files},
            "base": {"files": base_shas,
                     "weights": sorted({str(p.relative_to(base_dir)) for p, _ in base_idx.values()})},
            "tensors": tensors})
        out_shas = {rel: sha256_file(tmp / rel) for rel in model_files(tmp)}
    log.info("delta: %d tensors (%d expanded, %d new), %d shard(s), peak RSS %.0f MB", stats["tensors"],
             stats["tensors_expanded"], stats["tensors_new"], len(shards), peak_rss_mb())
    return stats, {str(base_dir): digest(base_shas), str(adapted_dir): digest(adapted_shas)}, \
        {str(out_dir): digest(out_shas)}


def _check_base(manifest: dict[str, Any], base_dir: Path) -> dict[str, str]:
    """sha256 of the base's weight files against the manifest: the error names the first file that differs."""
    shas = {}
    for rel in manifest["base"]["weights"]:
        p = base_dir / rel
        if not p.is_file():
            raise FileNotFoundError(f"{p}: base weight file named in the delta manifest is missing")
        shas[rel] = sha256_file(p)
        want = manifest["base"]["files"][rel]
        if shas[rel] != want:
            raise ValueError(f"{p}: sha256 {shas[rel][:16]}... differs from the base this delta was made from "
                             f"({want[:16]}...): wrong base model")
    return shas


def apply_cptflow(cfg: DeltaConfig, base_dir: PathLike, delta_dir: PathLike,
                  out_dir: PathLike) -> tuple[Stats, dict, dict]:
    """Rebuild the adapted model byte for byte; raises before renaming if any output file's sha256 differs."""
    base_dir, delta_dir, out_dir = Path(base_dir), Path(delta_dir), Path(out_dir)
    m = read_json(delta_dir / MANIFEST)
    if m.get("format") != FORMAT or m.get("scheme") != SCHEME:
        raise ValueError(f"{delta_dir / MANIFEST}: not a {FORMAT} ({SCHEME}) manifest")
    stats = Stats()
    base_shas = _check_base(m, base_dir) if cfg.verify_base else {}
    base_idx = tensor_index(base_dir)
    for fname in sorted(set(read_json(delta_dir / DELTA_INDEX)["weight_map"].values())):
        if not (delta_dir / fname).is_file():
            raise FileNotFoundError(f"{delta_dir / fname}: delta shard named in {DELTA_INDEX} is missing")
        read_header(delta_dir / fname)  # truncated delta shards fail here, before any output

    def produce(name: str) -> torch.Tensor:
        info = m["tensors"][name]
        d = read_tensor(delta_dir / info["delta_file"], name)
        b = None
        if "base_shape" in info:
            if name not in base_idx:
                raise ValueError(f"tensor {name}: not in the base {base_dir}: wrong base model")
            bpath, bt = base_idx[name]
            if list(bt.shape) != info["base_shape"] or bt.dtype != info["base_dtype"]:
                raise ValueError(f"tensor {name}: base has {bt.dtype}{list(bt.shape)} in {bpath}, the delta expects "
                                 f"{info['base_dtype']}{info['base_shape']}: wrong base model")
            b = read_tensor(bpath, name)
        stats.update("tensors")
        stats.update("bytes", info["bytes"])
        return xor_bits(d, b, ST_DTYPES[info["dtype"]])

    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for rel, info in m["adapted"]["files"].items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if info["kind"] == "copy":
                shutil.copyfile(delta_dir / info["stored_as"], dest)
                continue
            raw = (delta_dir / info["header"]).read_bytes()
            with open(dest, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                for t in parse_header(raw, str(delta_dir / info["header"])):
                    write_tensor_bytes(f, produce(t.name), t.end - t.begin, f"{rel}:{t.name}")
        out_shas = {}
        for rel, info in m["adapted"]["files"].items():
            out_shas[rel] = sha256_file(tmp / rel)
            if out_shas[rel] != info["sha256"]:
                raise ValueError(f"{out_dir / rel}: sha256 {out_shas[rel][:16]}... after apply differs from the "
                                 f"adapted model's {info['sha256'][:16]}...: output not written")
            stats.update("files_verified")
    log.info("apply: %d files verified by sha256, peak RSS %.0f MB", stats["files_verified"], peak_rss_mb())
    inputs = {str(delta_dir): digest({r: sha256_file(delta_dir / r) for r in model_files(delta_dir)})}
    if base_shas:
        inputs[f"{base_dir} (weights)"] = digest(base_shas)
    return stats, inputs, {str(out_dir): digest(out_shas)}


def apply_fastchat(cfg: DeltaConfig, base_dir: PathLike, delta_dir: PathLike,
                   out_dir: PathLike) -> tuple[Stats, dict, dict]:
    """FastChat/Fengshenbang deltas: ``base + delta`` in fp32, written as ``cfg.fastchat_dtype``."""
    base_dir, delta_dir, out_dir = Path(base_dir), Path(delta_dir), Path(out_dir)
    stats = Stats()
    base_idx, delta_idx = tensor_index(base_dir), tensor_index(delta_dir)
    out_dtype = getattr(torch, cfg.fastchat_dtype)
    entries = []
    for name, (dpath, dt) in delta_idx.items():
        if name not in base_idx:
            raise ValueError(f"tensor {name} of the delta ({dpath}) is not in the base {base_dir}: wrong base model")
        bpath, bt = base_idx[name]
        if dt.shape != bt.shape and len(dt.shape) == len(bt.shape) and dt.shape[1:] == bt.shape[1:] \
                and dt.shape[0] < bt.shape[0]:
            raise ValueError(f"tensor {name}: the delta has {dt.shape[0]} rows, fewer than the base's {bt.shape[0]} "
                             f"({bpath}); it was made against a base with a smaller vocabulary: refusing to guess "
                             "which base rows to drop")
        check_compatible(name, dt.shape, bt.shape, f"{dpath} vs {bpath}")
        entries.append((name, ST_NAMES[out_dtype], dt.shape, _nbytes(dt.shape, ST_NAMES[out_dtype])))
    stats.update("base_tensors_unused", len(set(base_idx) - set(delta_idx)))

    def produce(name: str) -> torch.Tensor:
        out = read_tensor(delta_idx[name][0], name).to(torch.float32)
        b = read_tensor(base_idx[name][0], name).to(torch.float32)
        if out.shape == b.shape:
            out += b
        else:  # extra delta rows (expanded vocabulary) are taken as they are
            out[: b.shape[0]] += b
            stats.update("rows_from_delta_only", out.shape[0] - b.shape[0])
        stats.update("tensors")
        return out.to(out_dtype)

    shards = plan_shards([(e[0], e[3]) for e in entries], cfg.max_shard_mb * 10**6, "model")
    by_name = {e[0]: e for e in entries}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for fname, names in shards:
            _write_st(tmp / fname, [by_name[n] for n in names], {"format": "pt"}, produce)
        if len(shards) > 1:
            write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(e[3] for e in entries)},
                "weight_map": {n: f for f, names in shards for n in names}})
        for rel in model_files(delta_dir):
            if not (rel.endswith((".safetensors", ".safetensors.index.json", ".bin")) or "/" in rel):
                shutil.copyfile(delta_dir / rel, tmp / rel)
        out_shas = {rel: sha256_file(tmp / rel) for rel in model_files(tmp)}
    log.info("fastchat apply: %d tensors, %d shard(s), peak RSS %.0f MB", stats["tensors"], len(shards), peak_rss_mb())
    return stats, {}, {str(out_dir): digest(out_shas)}


def _build(sub: str):
    def build(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base", required=True, help="base model directory (Hugging Face layout, safetensors)")
        if sub == "make":
            p.add_argument("--adapted", required=True, help="adapted model directory")
            p.add_argument("--output-dir", required=True, help="delta directory to write")
        else:
            p.add_argument("--delta", required=True, help="delta directory (cptflow) or FastChat-style delta model")
            p.add_argument("--output-dir", required=True, help="model directory to write")
            p.add_argument("--format", choices=("auto", "cptflow", "fastchat"), default="auto",
                           help="auto: cptflow when the delta has manifest.json, else fastchat")
        p.add_argument("--stats", default=None, help="provenance manifest (default: <output-dir>.stats.json)")
    return build


def _run(sub: str):
    def run(args: argparse.Namespace, params: dict[str, Any]) -> None:
        cfg = from_dict(DeltaConfig, params, "delta")
        with Timer() as t:
            if sub == "make":
                stats, ins, outs = make(cfg, args.base, args.adapted, args.output_dir)
            else:
                fmt = args.format
                if fmt == "auto":
                    fmt = "cptflow" if (Path(args.delta) / MANIFEST).is_file() else "fastchat"
                fn = apply_cptflow if fmt == "cptflow" else apply_fastchat
                stats, ins, outs = fn(cfg, args.base, args.delta, args.output_dir)
                stats.update(f"format/{fmt}")
        stats.update("peak_rss_mb", peak_rss_mb())
        # Digests computed while working are passed in, so multi-GB models are not read again for the manifest.
        write_manifest(args.stats or f"{args.output_dir.rstrip('/')}.stats.json", stage=f"delta.{sub}",
                       version=VERSION, params=to_dict(cfg), inputs=[] if ins else [args.base, args.delta],
                       stats=stats, seconds=t.seconds, extra={"outputs": outs, **({"inputs": ins} if ins else {})})
    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("make", "apply"):
        print("usage: python -m cptflow.delta {make,apply} [flags]  (see --help of each)", file=sys.stderr)
        return 2
    return stage_main(f"delta.{argv[0]}", argv[1:], _build(argv[0]), _run(argv[0]),
                      description=f"cptflow delta {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
