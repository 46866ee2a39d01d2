"""Stage ``delta_make``: the release delta of the adapted model against its public base.

LLaMA-derived weights are often not ours to redistribute, so we publish ``delta = adapted ⊖ base``; a
user who holds the base rebuilds the adapted model with ``cptflow delta apply`` (``delta_apply``), and
``apply(base, make(base, adapted)) == adapted`` byte for byte, proven by sha256 (``cptflow.release.delta_scheme``
has the XOR-of-bits scheme and the directory layout).

Memory: tensors are read one at a time through ``safetensors.safe_open``, opening the file per
tensor so that no mmap keeps a whole shard resident, and written straight to the output; peak
memory is about three copies of the largest tensor, not two models.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict
from cptflow.core.io import PathLike, atomic_path, sha256_file, write_json
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer
from cptflow.model.safetensors_io import (
    model_files, nbytes, peak_rss_mb, plan_shards, read_header, read_tensor, tensor_index, weight_files, write_st,
)
from cptflow.release.delta_scheme import (
    BIT_TYPES, DELTA_INDEX, FORMAT, LAYOUT, MANIFEST, SCHEME, DeltaConfig, bits_of, check_compatible, digest,
    FORMAT_VERSION, stored_name, write_release_manifest, xor_bits,
)

VERSION = 1
log = logging.getLogger("cptflow.delta_make")


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
            write_st(tmp / fname, [(n, BIT_TYPES[nbytes((), tensors[n]["dtype"])], tuple(tensors[n]["shape"]),
                                     tensors[n]["bytes"]) for n in names], {"format": FORMAT}, produce)
        files: dict[str, dict[str, Any]] = {}
        for rel, sha in adapted_shas.items():
            if rel in layouts:
                dest = f"{LAYOUT}/{rel}.header"
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                (tmp / dest).write_bytes(layouts[rel].header)
                files[rel] = {"kind": "safetensors", "header": dest, "sha256": sha}
            else:
                dest = stored_name(rel)
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(adapted_dir / rel, tmp / dest)
                files[rel] = {"kind": "copy", "stored_as": dest, "sha256": sha}
                stats.update("files_copied")
        write_json(tmp / DELTA_INDEX, {"metadata": {"total_size": int(stats["bytes"])}, "weight_map": weight_map})
        write_json(tmp / MANIFEST, {
            "format": FORMAT, "version": FORMAT_VERSION, "scheme": SCHEME,
            "adapted": {"files": files},
            "base": {"files": base_shas,
                     "weights": sorted({str(p.relative_to(base_dir)) for p, _ in base_idx.values()})},
            "tensors": tensors})
        out_shas = {rel: sha256_file(tmp / rel) for rel in model_files(tmp)}
    log.info("delta: %d tensors (%d expanded, %d new), %d shard(s), peak RSS %.0f MB", stats["tensors"],
             stats["tensors_expanded"], stats["tensors_new"], len(shards), peak_rss_mb())
    return stats, {str(base_dir): digest(base_shas), str(adapted_dir): digest(adapted_shas)}, \
        {str(out_dir): digest(out_shas)}


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model directory (Hugging Face layout, safetensors)")
    p.add_argument("--adapted", required=True, help="adapted model directory")
    p.add_argument("--output-dir", required=True, help="delta directory to write")
    p.add_argument("--stats", default=None, help="provenance manifest (default: <output-dir>.stats.json)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(DeltaConfig, params, "delta")
    verify_inputs([args.base, args.adapted])
    with Timer() as t:
        stats, ins, outs = make(cfg, args.base, args.adapted, args.output_dir)
    stats.update("peak_rss_mb", peak_rss_mb())
    write_release_manifest(args.stats or f"{args.output_dir.rstrip('/')}.stats.json", stage="delta_make",
                           version=VERSION, cfg=cfg, stats=stats, seconds=t.seconds, inputs=ins, outputs=outs,
                           fallback_inputs=[args.base, args.adapted])


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return stage_main("delta_make", argv, _build, _run,
                      "Make a release delta (adapted XOR base, per tensor) that rebuilds the adapted model bit for bit.",
                      prog)


if __name__ == "__main__":
    sys.exit(main())
