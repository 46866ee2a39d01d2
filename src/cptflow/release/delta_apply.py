"""Stage ``delta_apply``: rebuild the adapted model from its base and a release delta, bit for bit.

The workflow runs it on every release (a delta that does not rebuild the adapted model fails the run),
and users run it as ``cptflow delta apply --base DIR --delta DIR --output DIR``. Every output file is
checked against the sha256 in the delta's manifest before the directory is renamed into place, and the
base's weight files are checked first (``verify_base``), so a wrong base fails naming the file.

Memory: tensors are read one at a time through ``safetensors.safe_open``, opening the file per
tensor so that no mmap keeps a whole shard resident, and written straight to the output; peak
memory is about three copies of the largest tensor, not two models.

``apply --format fastchat`` applies public FastChat/Fengshenbang deltas: plain float arithmetic
``base + delta`` (computed in fp32, written in ``fastchat_dtype``); a delta with more embedding rows
than the base keeps its extra rows as they are. Such outputs are not bit-exact by nature.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict
from cptflow.core.io import PathLike, atomic_path, read_json, sha256_file, write_json
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer
from cptflow.model.safetensors_io import (
    ST_DTYPES, ST_NAMES, model_files, nbytes, parse_header, peak_rss_mb, plan_shards, read_header, read_tensor,
    tensor_index, write_st, write_tensor_bytes,
)
from cptflow.release.delta_scheme import (
    DELTA_INDEX, FORMAT, MANIFEST, SCHEME, DeltaConfig, check_compatible, digest, write_release_manifest,
    xor_bits,
)

VERSION = 1
log = logging.getLogger("cptflow.delta_apply")


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
        entries.append((name, ST_NAMES[out_dtype], dt.shape, nbytes(dt.shape, ST_NAMES[out_dtype])))
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
            write_st(tmp / fname, [by_name[n] for n in names], {"format": "pt"}, produce)
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


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model directory (Hugging Face layout, safetensors)")
    p.add_argument("--delta", required=True, help="delta directory (cptflow) or FastChat-style delta model")
    p.add_argument("--output-dir", "--output", dest="output_dir", required=True, help="model directory to write")
    p.add_argument("--format", choices=("auto", "cptflow", "fastchat"), default="auto",
                   help="auto: cptflow when the delta has manifest.json, else fastchat")
    p.add_argument("--stats", default=None, help="provenance manifest (default: <output-dir>.stats.json)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(DeltaConfig, params, "delta")
    if not Path(args.delta).is_dir():
        raise FileNotFoundError(f"{args.delta}: delta directory does not exist")
    verify_inputs([args.base])  # the delta itself is checked file by file against its own manifest
    fmt = args.format
    if fmt == "auto":
        fmt = "cptflow" if (Path(args.delta) / MANIFEST).is_file() else "fastchat"
    with Timer() as t:
        stats, ins, outs = (apply_cptflow if fmt == "cptflow" else apply_fastchat)(cfg, args.base, args.delta,
                                                                                    args.output_dir)
    stats.update(f"format/{fmt}")
    stats.update("peak_rss_mb", peak_rss_mb())
    write_release_manifest(args.stats or f"{args.output_dir.rstrip('/')}.stats.json", stage="delta_apply",
                           version=VERSION, cfg=cfg, stats=stats, seconds=t.seconds, inputs=ins, outputs=outs,
                           fallback_inputs=[args.base, args.delta])
    log.info("wrote %s", args.output_dir)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return stage_main("delta_apply", argv, _build, _run,
                      "Apply a release delta to its base model: the adapted model, checked file by file by sha256.",
                      prog)


if __name__ == "__main__":
    sys.exit(main())
