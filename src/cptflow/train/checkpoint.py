"""Training checkpoints: written to a temp directory, marked complete, renamed; the last K are kept.

Layout (one directory per run fingerprint, so a changed config or input never resumes from a
checkpoint of a different run)::

    <checkpoint_dir>/run-<fingerprint12>/
        step_00000050/             complete: renamed from .step_00000050.tmp after COMPLETE was written
            COMPLETE               marker; a directory without it is never loaded
            state.json             step, sample offset, tokens seen, spike-guard history, config, ...
            metrics.jsonl          the per-step rows up to this step (the report must not lose them)
            model.safetensors      DDP: fp32 master weights (safetensors handles tied embeddings)
            optimizer.pt           DDP: AdamW (+ fp16 scaler) state, torch.save, loaded weights_only
            deepspeed/             DeepSpeed: its own partitioned checkpoint (every rank writes)
            rng_rank<r>.pt         torch/CUDA/numpy/python RNG states of rank r (weights_only-safe)
        .step_00000060.tmp/        a save that died: ignored, removed at the next start
        tensorboard/, metrics.live.jsonl   live logs of rank 0

A kill at any moment leaves either the previous complete checkpoints or the new one, never a
half-written directory under a ``step_*`` name. The data position is the global sample offset, so
resuming replays nothing and does not depend on the number of processes (DDP weights are stored whole;
DeepSpeed's ZeRO shards do need the same world size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptflow.train import parallel
from cptflow.core.io import read_json, write_json, write_jsonl
from cptflow.train.metrics import read_rows

log = logging.getLogger("cptflow.train.checkpoint")
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def input_signature(paths: Iterable[str | Path]) -> list[list[Any]]:
    """Cheap identity of input directories: (file, size, mtime_ns) per file; a re-made input differs."""
    sig: list[list[Any]] = []
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file())
        for f in files:
            st = f.stat()
            sig.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return sig


def fingerprint(params: Mapping[str, Any], inputs: Iterable[str | Path]) -> str:
    """sha256 over what determines the trajectory: the params given and the inputs' signatures."""
    blob = json.dumps({"params": params, "inputs": input_signature(inputs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_dir(checkpoint_dir: str | Path, fp: str) -> Path:
    return Path(checkpoint_dir) / f"run-{fp[:12]}"


def complete_checkpoints(rdir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not rdir.is_dir():
        return []
    found = []
    for d in rdir.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(rdir: Path) -> Path | None:
    ckpts = complete_checkpoints(rdir)
    return ckpts[-1][1] if ckpts else None


def remove_stale(rdir: Path) -> list[Path]:
    """Delete temp directories of saves that died (rank 0, before anything else runs)."""
    stale = sorted(rdir.glob(".step_*.tmp")) if rdir.is_dir() else []
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors, lists and numbers only, so ``torch.load(weights_only=True)`` reads them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save(rdir: Path, step: int, engine: Any, state: Mapping[str, Any], rows: list[dict[str, Any]],
         info: parallel.DistInfo, keep_last: int) -> Path:
    """Write checkpoint ``step`` on all ranks (collective: every rank must call), return its path."""
    final = rdir / f"step_{step:08d}"
    tmp = rdir / f".step_{step:08d}.tmp"
    if info.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    engine.save(tmp, info.rank)
    torch.save(capture_rng(), tmp / f"rng_rank{info.rank}.pt")
    parallel.barrier()  # every rank's files are in place before the marker says so
    if info.rank == 0:
        write_json(tmp / "state.json", dict(state))
        write_jsonl(tmp / "metrics.jsonl", rows)
        (tmp / MARKER).write_text(f"step {step}\n", encoding="utf-8")
        if final.exists():  # a rerun that re-saves the final step: replace, never mix
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(rdir, keep_last)
    parallel.barrier()
    return final


def prune(rdir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    ckpts = complete_checkpoints(rdir)
    gone = [p for _, p in ckpts[:-keep_last]] if keep_last > 0 else []
    for p in gone:
        # Rename first so that a kill mid-delete cannot leave a step_* dir that lost files but kept its marker.
        doomed = p.with_name(f".{p.name}.tmp")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return gone


def load(path: Path, engine: Any, info: parallel.DistInfo) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore weights, optimizer and this rank's RNG from ``path``; return (state, metrics rows)."""
    engine.load(path)
    rng = path / f"rng_rank{info.rank}.pt"
    if rng.exists():
        restore_rng(torch.load(rng, weights_only=True))
    else:  # more processes than the run that saved: this rank keeps its fresh seed
        log.warning("%s: no RNG state for rank %d; keeping this run's seed", path, info.rank)
    return read_json(path / "state.json"), read_rows(path / "metrics.jsonl")


def resume(rdir: Path, engine: Any, info: parallel.DistInfo,
           global_batch: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Load the last complete checkpoint of this run into ``engine``: (state, metrics rows), or (None, []).

    Collective: rank 0 cleans up and decides, every rank loads the same checkpoint. The saved global
    batch (and, for engines whose shards are tied to it, the world size) is checked *before* loading:
    a mismatch must not half-load.
    """
    if info.rank == 0:
        for d in remove_stale(rdir):
            log.warning("removed incomplete checkpoint %s", d)
        others = sorted(p.name for p in rdir.parent.glob("run-*") if p != rdir)
        if others:
            log.warning("checkpoints of other configurations/inputs in %s not used: %s", rdir.parent, others)
    parallel.barrier()
    ckpt = parallel.broadcast_object(str(latest(rdir) or ""))
    if not ckpt:
        return None, []
    saved = read_json(Path(ckpt) / "state.json")
    if saved["global_batch"] != global_batch:
        raise ValueError(f"{ckpt}: written with global batch {saved['global_batch']}, this run has {global_batch}; "
                         f"set global_batch_size: {saved['global_batch']} to resume")
    if not engine.any_world_size and saved["world_size"] != info.world_size:
        raise ValueError(f"{ckpt}: {engine.name} checkpoint of {saved['world_size']} processes (partitioned); "
                         "resume with as many")
    state, rows = load(Path(ckpt), engine, info)
    log.info("resumed from %s: step %d, sample offset %d", ckpt, state["step"], state["samples_seen"])
    return state, rows
