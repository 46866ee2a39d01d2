"""The update loop every training stage runs: CPT's ``train/<stage>`` and SFT's ``finetune``.

The stage sets up (processes, data order, model, engine, the run's checkpoint directory) and hands
over an engine (``cptflow.train.engines``) and ``read(offset)``, which returns this rank's share of
the global batch at sample ``offset`` (``cptflow.train.data.read_batch`` or the same shape). ``run``
then resumes from the last complete checkpoint of the run, reads batches ahead in a background
thread, and makes one update per global batch:

* the loss of a micro-batch is its summed token loss over the global batch's target count, so the
  update is the global mean whatever the layout (micro-batch x accumulation x processes);
* the spike guard (``cptflow.train.spike_guard``): a step whose global loss exceeds
  ``loss_spike_factor`` x the mean of the last ``loss_spike_window`` accepted losses (or is not
  finite) is *skipped*: its gradients are dropped and the optimizer never runs, so weights and AdamW's
  moments and step count stay bit-identical under every engine (``cptflow.train.optim``); the data
  still advances, it is counted and logged. We skip rather than roll back: a rollback replays the same
  batches and spikes again. ``loss_spike_window`` consecutive skips abort the stage;
* a metrics row per update, an INFO line every ``log_every``, a checkpoint every ``checkpoint_every``
  (and at the end) with the data position in it.

``cfg`` is the stage's config dataclass; the loop reads only fields both stages share
(``micro_batch_size``, ``log_every``, ``checkpoint_every``, ``keep_last``, ``loss_spike_factor``,
``loss_spike_window``, ``prefetch_batches``, ``tensorboard``). What the stage exports afterwards (a
model, an adapter) is its own business; ``write_logs`` writes the metrics and TensorBoard outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cptflow.core.config import to_dict
from cptflow.core.io import atomic_path, write_jsonl
from cptflow.train import checkpoint, metrics, parallel
from cptflow.train import data as train_data
from cptflow.train.schedule import lr_at
from cptflow.train.spike_guard import SpikeGuard

log = logging.getLogger("cptflow.train.loop")


@dataclass(frozen=True)
class DebugHooks:
    samples_dir: Path | None = None  # rank<r>.jsonl: {"step", "rank", "ids"} per update
    step_delay_s: float = 0.0  # sleep after each update (gives a kill test time to act)
    spike_steps: tuple[int, ...] = ()  # 1-based updates whose loss is multiplied by spike_scale
    spike_scale: float = 1000.0

    @staticmethod
    def add_flags(p: argparse.ArgumentParser) -> None:
        """The loop's flags in a training stage's CLI: where it writes, and the testing aids (off by default)."""
        p.add_argument("--checkpoint-dir", required=True, type=Path, help="checkpoints (not a Snakemake output)")
        p.add_argument("--metrics", required=True, type=Path, help="per-step metrics JSONL")
        p.add_argument("--tensorboard-dir", type=Path, default=None, help="TensorBoard event dir")
        p.add_argument("--stats", required=True, type=Path, help="manifest JSON")
        p.add_argument("--debug-samples", type=Path, default=None, help="testing aid: per-rank sample ids per step")
        p.add_argument("--debug-step-delay-s", type=float, default=0.0, help="testing aid: sleep after each step")
        p.add_argument("--debug-spike-steps", default="", help="testing aid: comma-separated steps with loss x1000")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DebugHooks:
        if args.debug_samples:
            args.debug_samples.mkdir(parents=True, exist_ok=True)
        return cls(args.debug_samples, args.debug_step_delay_s,
                   tuple(int(s) for s in args.debug_spike_steps.split(",") if s.strip()))


@dataclass
class LoopResult:
    state: dict[str, Any]  # step, samples_seen, tokens_seen, target_tokens_seen, skipped_*, ...
    mlog: metrics.MetricsLog | None  # rank 0 only
    meter: metrics.Throughput
    resumed_from: int  # the step the run resumed at (0: a fresh run)


def fresh_state(global_batch: int, world_size: int) -> dict[str, Any]:
    return {"step": 0, "samples_seen": 0, "tokens_seen": 0, "target_tokens_seen": 0, "skipped_spike": 0,
            "skipped_nonfinite": 0, "spike_history": [], "spike_consecutive": 0, "global_batch": global_batch,
            "world_size": world_size}


def run(engine: Any, cfg: Any, info: parallel.DistInfo, rdir: Path, read: Callable[[int], dict[str, np.ndarray]],
        total: int, global_batch: int, sched: Any, hooks: DebugHooks = DebugHooks(), flops_token: float = 0.0,
        peak: float | None = None) -> LoopResult:
    """Resume, then update until step ``total``; collective (every rank calls it)."""
    rank, world, device = info.rank, info.world_size, info.device
    saved, rows = checkpoint.resume(rdir, engine, info, global_batch)
    state = {**fresh_state(global_batch, world), **(saved or {})}  # older checkpoints lack newer counters
    resumed_from = state["step"]
    guard = SpikeGuard(cfg.loss_spike_factor, cfg.loss_spike_window, state["spike_history"], state["spike_consecutive"])
    mlog = metrics.MetricsLog(rdir / "metrics.live.jsonl", rows, rdir / "tensorboard" if cfg.tensorboard else None) \
        if rank == 0 else None
    meter = metrics.Throughput()
    bar = tqdm(total=total, initial=state["step"], disable=rank != 0, unit="step", file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    # The batches of the coming steps are read in a background thread: the order is fixed, so it can run ahead.
    first, offset = state["step"], state["samples_seen"]
    prefetch = train_data.Prefetcher(lambda i: read(offset + (i - first) * global_batch), range(first, total),
                                     cfg.prefetch_batches, pin=device.type == "cuda")
    engine.model.train()
    while state["step"] < total:
        step = state["step"] + 1  # 1-based number of the update being made
        lr = lr_at(step - 1, sched)
        batch, wait_s = prefetch.get()
        n_targets, n_tokens = parallel.all_reduce_sum([batch["targets"], batch["real_tokens"]], device)
        nll_total = torch.zeros((), dtype=torch.float64, device=device)
        micros = train_data.micro_batches(batch, cfg.micro_batch_size, device)
        last = -(-batch["input_ids"].shape[0] // cfg.micro_batch_size) - 1
        for i, micro in enumerate(micros):
            with engine.accumulating(last=i == last):  # gradients sync on the last micro-batch only
                with engine.autocast():
                    nll = engine.model(**micro)
                if step in hooks.spike_steps:
                    nll = nll * hooks.spike_scale
                engine.backward(nll / max(n_targets, 1.0))  # this micro-batch's share of the global mean
            nll_total += nll.detach().double()
        loss = parallel.all_reduce_sum([nll_total.item()], device)[0] / max(n_targets, 1.0)  # one sync per step
        accepted = guard.accept(loss)
        grad_norm = engine.step(lr, apply=accepted)
        if not accepted:
            state["skipped_spike" if math.isfinite(loss) else "skipped_nonfinite"] += 1
            log.warning("step %d: loss %.4g skipped (recent mean %.4g)", step, loss,
                        sum(guard.history) / max(len(guard.history), 1))
        tok_s = meter.step(int(n_tokens))  # real tokens of all ranks
        state.update(step=step, samples_seen=state["samples_seen"] + global_batch,
                     tokens_seen=state["tokens_seen"] + int(n_tokens),
                     target_tokens_seen=state["target_tokens_seen"] + int(n_targets), spike_history=guard.history,
                     spike_consecutive=guard.consecutive, world_size=world)
        if hooks.samples_dir is not None:
            with open(Path(hooks.samples_dir) / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "rank": rank, "ids": batch["ids"].tolist()}) + "\n")
        if mlog is not None:
            mfu = metrics.mfu(tok_s, flops_token, peak, world)
            mlog.add({"step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": round(tok_s, 1), "tokens_seen": state["tokens_seen"],
                      "samples_seen": state["samples_seen"], "skipped": not accepted, "mfu": mfu,
                      "data_wait_s": round(wait_s, 4), "peak_mem_gib": metrics.peak_memory_gib(device)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
            if step % cfg.log_every == 0 or step == total:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %s tokens/s %.0f%s data wait %.3fs eta %.0fs", step,
                         total, loss, lr, f"{grad_norm:.3g}" if grad_norm is not None else "-", tok_s,
                         f" mfu {mfu:.3f}" if mfu is not None else "", wait_s, meter.eta_s(total - step))
        if step % cfg.checkpoint_every == 0 or step == total:
            with meter.excluded():  # not training time: tokens/s and MFU leave it out
                checkpoint.save(rdir, step, engine, {**state, "config": to_dict(cfg)}, mlog.rows if mlog else [],
                                info, cfg.keep_last)
        if hooks.step_delay_s:
            time.sleep(hooks.step_delay_s)
    prefetch.close()
    bar.close()
    return LoopResult(state, mlog, meter, resumed_from)


def write_logs(mlog: metrics.MetricsLog, rdir: Path, metrics_path: Path, tensorboard_dir: Path | None) -> None:
    """Rank 0, after the loop: metrics.jsonl (every update of the run, resumed ones included) and TensorBoard."""
    mlog.close()
    write_jsonl(metrics_path, mlog.rows)
    if tensorboard_dir is not None:
        with atomic_path(tensorboard_dir) as tmp:
            tb = rdir / "tensorboard"
            shutil.copytree(tb, tmp) if tb.is_dir() else tmp.mkdir(parents=True)


def accepted_losses(mlog: metrics.MetricsLog) -> list[float]:
    return [r["loss"] for r in mlog.rows if not r["skipped"] and r["loss"] is not None]
