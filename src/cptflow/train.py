"""train/<stage>: one stage of continual pre-training (embed-align, full, replay, ...).

Reads top to bottom like nanoGPT's train.py: setup -> data -> model -> engine -> resume -> loop ->
export. Distribution lives in ``parallel``, the model in ``modeling``, checkpoints in ``checkpoint``,
the lr in ``schedule``, throughput/MFU in ``metrics``, the sample order in ``train_data``.

Launch (always torchrun, never ``accelerate launch``; a plain ``python -m`` is one process)::

    torchrun --nproc_per_node N -m cptflow.train --model DIR --data DIR --output-dir DIR \\
        --checkpoint-dir DIR --metrics M.jsonl [--tensorboard-dir DIR] --stats S.json \\
        --params '<TrainStageConfig json>' --log-file L

CPU: DDP over gloo, fp32 or bf16 autocast. GPU: DDP over NCCL, or DeepSpeed ZeRO-1/2/3 when the
stage names a json (``deepspeed: config/deepspeed/zero2.json``); flash-attn 2 when importable.

Outputs (all written by rank 0 through a temporary name, then renamed):

* ``--output-dir``: HF model dir — model.safetensors (stored dtype of the input model), config.json,
  and the input's tokenizer/generation files copied unchanged;
* ``--metrics``: JSONL, one row per update: step, loss (global mean over target tokens), lr,
  grad_norm (pre-clip; null when skipped), tokens_per_s (positions incl. padding, all ranks),
  tokens_seen (non-padding tokens so far), samples_seen, skipped, mfu (null without a known peak);
* ``--tensorboard-dir``: TensorBoard events of the same scalars (empty when ``tensorboard: false``);
* ``--stats``: manifest (cptflow.stats.write_manifest) with counts and a ``summary`` block.

Checkpoints go to ``--checkpoint-dir`` (see cptflow.checkpoint); rerunning a stage whose job died
resumes from the last complete one. Keep that directory out of the rule's outputs: Snakemake deletes
the outputs of a failed job; multi-node runs need it on a shared file system. A rerun with a changed
setting that shapes the trajectory (lr, schedule, steps, data selection, seed, precision, ...) or a
re-made input starts afresh in a new ``run-<fingerprint>`` subdirectory; batch layout, kernels,
logging and checkpoint settings may change across a resume (the global batch may not).

Loss-spike guard: a step whose global loss exceeds ``loss_spike_factor`` x the mean of the last
``loss_spike_window`` accepted losses (or is not finite) is *skipped*: its gradients are dropped and
no update is applied (DDP; DeepSpeed applies it with lr 0), the data still advances, it is counted
and logged. We skip rather than roll back: a rollback replays the same batches and spikes again.
``loss_spike_window`` consecutive skips abort the stage: that is a shift, not a spike.

Testing aids (flags, off by default): ``--debug-samples DIR`` (per-rank JSONL of sample ids per step),
``--debug-step-delay-s`` (sleep per step), ``--debug-spike-steps 3,7`` (loss x1000 on those steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cptflow import checkpoint, metrics, modeling, parallel, train_data
from cptflow.cli import stage_main
from cptflow.config import from_dict, to_dict
from cptflow.io import atomic_path, read_json, write_jsonl
from cptflow.schedule import lr_at, make_schedule
from cptflow.stats import Stats, write_manifest
from cptflow.train_config import TrainStageConfig

VERSION = 1
log = logging.getLogger("cptflow.train")
# Settings that do not change the trajectory: a rerun with other values still resumes.
NOT_TRAJECTORY = {"name", "checkpoint_every", "keep_last", "log_every", "tensorboard", "peak_tflops", "attn",
                  "micro_batch_size", "grad_accum_steps", "global_batch_size", "gradient_checkpointing"}


@dataclass(frozen=True)
class TrainPaths:
    model: Path  # input HF model dir
    data: Path  # packed dataset (datasets.save_to_disk)
    output_dir: Path  # final HF model dir
    checkpoint_dir: Path
    metrics: Path
    stats: Path
    tensorboard_dir: Path | None = None


@dataclass(frozen=True)
class DebugHooks:
    samples_dir: Path | None = None  # rank<r>.jsonl: {"step", "rank", "ids"} per update
    step_delay_s: float = 0.0  # sleep after each update (gives a kill test time to act)
    spike_steps: tuple[int, ...] = ()  # 1-based updates whose loss is multiplied by spike_scale
    spike_scale: float = 1000.0


class SpikeGuard:
    """Accept or skip a step from its loss and the mean of recent accepted losses (state is plain data)."""

    def __init__(self, factor: float | None, window: int, history: list[float] = (), consecutive: int = 0):
        self.factor, self.window = factor, window
        self.history, self.consecutive = list(history), consecutive

    def accept(self, loss: float) -> bool:
        full = len(self.history) >= self.window
        spike = self.factor is not None and full and loss > self.factor * (sum(self.history) / len(self.history))
        if not math.isfinite(loss) or spike:
            self.consecutive += 1
            if self.consecutive >= self.window:
                raise ValueError(f"loss stayed above loss_spike_factor x its recent mean for {self.consecutive} "
                                 "steps: a shift, not a spike; lower lr or raise loss_spike_factor")
            return False
        self.consecutive = 0
        self.history = (self.history + [loss])[-self.window:]
        return True


def plan_steps(cfg: TrainStageConfig, n_samples: int, length: int, global_batch: int) -> int:
    """Updates in the stage: max_steps, else the token budget, else one pass over the selection."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        return math.ceil(cfg.max_tokens / (global_batch * length))
    if n_samples < global_batch:
        raise ValueError(f"stage {cfg.name}: {n_samples} selected samples, "
                         f"fewer than one global batch ({global_batch})")
    return n_samples // global_batch


def run(cfg: TrainStageConfig, paths: TrainPaths, hooks: DebugHooks = DebugHooks()) -> Stats:
    t0 = time.perf_counter()
    # ---- setup: processes, seeds, batch layout
    info = parallel.init_distributed(deepspeed=cfg.deepspeed is not None)
    rank, world, device = info.rank, info.world_size, info.device
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    accum, gbatch = cfg.batch_layout(world)
    # ---- data: the global sample order (independent of world size)
    ds, length = train_data.open_dataset(paths.data)
    if cfg.max_length is not None and cfg.max_length != length:
        raise ValueError(f"{paths.data}: samples have length {length}, the stage expects max_length {cfg.max_length}")
    codes, names, buckets = train_data.index_columns(ds)
    rows_sel = train_data.select_rows(codes, names, buckets, cfg.categories, cfg.buckets, str(paths.data))
    order = train_data.SampleOrder(rows_sel, buckets, cfg.seed)
    total = plan_steps(cfg, order.n, length, gbatch)
    if total * gbatch > order.n:
        log.warning("stage needs %d samples, the selection has %d: %.2f passes", total * gbatch, order.n,
                    total * gbatch / order.n)
    sched = make_schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, total, cfg.schedule)
    # ---- model and engine
    attn = parallel.resolve_attn(cfg.attn, device, cfg.precision)
    ds_config = parallel.load_deepspeed_config(cfg.deepspeed, cfg, cfg.micro_batch_size, accum, world) \
        if cfg.deepspeed else None
    _keep = parallel.zero3_load_context(ds_config) if ds_config else None  # noqa: F841 (must stay alive)
    model = modeling.load_model(paths.model, attn)
    n_train = modeling.set_trainable(model, cfg.trainable)
    if cfg.gradient_checkpointing:
        modeling.enable_gradient_checkpointing(model)
    n_body = modeling.non_embedding_params(model)
    layers, hidden = modeling.model_dims(model)
    engine = (parallel.DeepSpeedEngine(model, cfg, info, ds_config) if ds_config
              else parallel.DDPEngine(model, cfg, info))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = metrics.peak_flops(dev_name if device.type == "cuda" else None, cfg.precision, cfg.peak_tflops)
    log.info("devices: %d x %s (%s), backend %s | precision %s | attention %s | %s | world size %d", world,
             dev_name, device.type, info.backend or "none", cfg.precision, attn,
             f"DeepSpeed ZeRO-{engine.zero_stage}" if ds_config else "DDP" if world > 1 else "single process", world)
    log.info("torch %s, transformers %s%s", torch.__version__, _version("transformers"),
             f", deepspeed {_version('deepspeed')}" if ds_config else "")
    log.info("stage %s: %d steps x %d samples (micro %d x accum %d x world %d) x %d tokens; trainable %s: %d params; "
             "gradient checkpointing %s; MFU peak %s", cfg.name, total, gbatch, cfg.micro_batch_size, accum, world,
             length, cfg.trainable, n_train, cfg.gradient_checkpointing,
             f"{peak / 1e12:.0f} TFLOP/s" if peak else "n/a")
    # ---- resume from the last complete checkpoint of this very run (same params and inputs)
    params = {k: v for k, v in to_dict(cfg).items() if k not in NOT_TRAJECTORY}
    rdir = checkpoint.run_dir(paths.checkpoint_dir, checkpoint.fingerprint({**params, "version": VERSION},
                                                                          [paths.model, paths.data]))
    if rank == 0:
        for d in checkpoint.remove_stale(rdir):
            log.warning("removed incomplete checkpoint %s", d)
        others = sorted(p.name for p in Path(paths.checkpoint_dir).glob("run-*") if p != rdir)
        if others:
            log.warning("checkpoints of other configurations/inputs in %s not used: %s", paths.checkpoint_dir, others)
    parallel.barrier()
    ckpt = parallel.broadcast_object(str(checkpoint.latest(rdir) or ""))
    state: dict[str, Any] = {"step": 0, "samples_seen": 0, "tokens_seen": 0, "skipped_spike": 0, "skipped_nonfinite": 0,
                             "spike_history": [], "spike_consecutive": 0, "global_batch": gbatch,
                             "world_size": world}
    rows: list[dict[str, Any]] = []
    if ckpt:
        saved = read_json(Path(ckpt) / "state.json")  # check before loading: a mismatch must not half-load
        if saved["global_batch"] != gbatch:
            raise ValueError(f"{ckpt}: written with global batch {saved['global_batch']}, this run has {gbatch}; "
                             f"set global_batch_size: {saved['global_batch']} to resume")
        if ds_config and saved["world_size"] != world:
            raise ValueError(f"{ckpt}: DeepSpeed (ZeRO-partitioned) checkpoint of {saved['world_size']} processes; "
                             "resume with as many")
        state, rows = checkpoint.load(Path(ckpt), engine, info)
        log.info("resumed from %s: step %d, sample offset %d", ckpt, state["step"], state["samples_seen"])
    resumed_from = state["step"]
    guard = SpikeGuard(cfg.loss_spike_factor, cfg.loss_spike_window, state["spike_history"], state["spike_consecutive"])
    mlog = metrics.MetricsLog(rdir / "metrics.live.jsonl", rows, rdir / "tensorboard" if cfg.tensorboard else None) \
        if rank == 0 else None
    flops_token = metrics.flops_per_token(n_body, layers, hidden, length)
    meter = metrics.Throughput()
    bar = tqdm(total=total, initial=state["step"], disable=rank != 0, unit="step", file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    # ---- the loop: one global batch per update
    engine.model.train()
    while state["step"] < total:
        step = state["step"] + 1  # 1-based number of the update being made
        lr = lr_at(step - 1, sched)
        mine = train_data.rank_share(order.ids(state["samples_seen"], gbatch), rank, world)
        batch = train_data.load_rows(ds, mine, length, str(paths.data))
        n_targets, n_tokens = parallel.all_reduce_sum(
            [train_data.count_targets(batch["labels"]), int((batch["labels"] != train_data.IGNORE_INDEX).sum())],
            device)
        nll_total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(accum):  # micro-batches; gradients sync on the last one only
            micro = {k: torch.from_numpy(v[i * cfg.micro_batch_size:(i + 1) * cfg.micro_batch_size]).to(device)
                     for k, v in batch.items()}
            with engine.accumulating(last=i == accum - 1):
                with engine.autocast():
                    nll = modeling.loss_sum(engine.model, micro)
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
        tok_s = meter.step(gbatch * length)
        state.update(step=step, samples_seen=state["samples_seen"] + gbatch,
                     tokens_seen=state["tokens_seen"] + int(n_tokens), spike_history=guard.history,
                     spike_consecutive=guard.consecutive, world_size=world)
        if hooks.samples_dir is not None:
            with open(Path(hooks.samples_dir) / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "rank": rank, "ids": mine.tolist()}) + "\n")
        if mlog is not None:
            mfu = metrics.mfu(tok_s, flops_token, peak, world)
            mlog.add({"step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": round(tok_s, 1), "tokens_seen": state["tokens_seen"],
                      "samples_seen": state["samples_seen"], "skipped": not accepted, "mfu": mfu})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
            if step % cfg.log_every == 0 or step == total:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %s tokens/s %.0f%s eta %.0fs", step, total, loss, lr,
                         f"{grad_norm:.3g}" if grad_norm is not None else "-", tok_s,
                         f" mfu {mfu:.3f}" if mfu is not None else "", meter.eta_s(total - step))
        if step % cfg.checkpoint_every == 0 or step == total:
            checkpoint.save(rdir, step, engine, {**state, "config": to_dict(cfg)}, mlog.rows if mlog else [], info,
                            cfg.keep_last)
        if hooks.step_delay_s:
            time.sleep(hooks.step_delay_s)
    bar.close()
    # ---- export: HF model dir, metrics, TensorBoard, manifest (rank 0; the others may exit: no
    # barrier after this, so hashing large inputs cannot run into a collective's timeout)
    weights = engine.export_state_dict()  # collective under ZeRO-3
    stats = Stats()
    if rank == 0:
        with atomic_path(paths.output_dir) as tmp:
            modeling.export_hf(engine.module, paths.model, tmp, modeling.stored_dtype(paths.model), weights)
        mlog.close()
        write_jsonl(paths.metrics, mlog.rows)
        if paths.tensorboard_dir is not None:
            with atomic_path(paths.tensorboard_dir) as tmp:
                tb = rdir / "tensorboard"
                shutil.copytree(tb, tmp) if tb.is_dir() else tmp.mkdir(parents=True)
        for key in ("step", "samples_seen", "tokens_seen", "skipped_spike", "skipped_nonfinite"):
            stats.update(key, state[key])
        accepted_losses = [r["loss"] for r in mlog.rows if not r["skipped"] and r["loss"] is not None]
        summary = {"total_steps": total, "resumed_from_step": resumed_from, "world_size": world, "device": dev_name,
                   "precision": cfg.precision, "attention": attn, "zero_stage": engine.zero_stage,
                   "global_batch": gbatch, "grad_accum_steps": accum, "sample_length": length,
                   "trainable_params": n_train, "non_embedding_params": n_body,
                   "final_loss": float(np.mean(accepted_losses[-10:])) if accepted_losses else None,
                   "tokens_per_s_mean": meter.mean_tokens_per_s() if meter.steps_total else None,
                   "checkpoint_run_dir": str(rdir)}
        write_manifest(paths.stats, stage=f"train/{cfg.name}", version=VERSION, params=to_dict(cfg),
                       inputs=[paths.model, paths.data], stats=stats, seconds=time.perf_counter() - t0,
                       outputs=[paths.output_dir, paths.metrics], extra={"summary": summary})
        log.info("stage %s done: %d steps (%d skipped), %d tokens -> %s", cfg.name, state["step"],
                 state["skipped_spike"] + state["skipped_nonfinite"], state["tokens_seen"], paths.output_dir)
    parallel.shutdown()
    return stats


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="input HF model dir (init_model or previous stage)")
    p.add_argument("--data", required=True, type=Path, help="packed dataset dir (datasets.load_from_disk)")
    p.add_argument("--output-dir", required=True, type=Path, help="final HF model dir")
    p.add_argument("--checkpoint-dir", required=True, type=Path, help="checkpoints (not a Snakemake output)")
    p.add_argument("--metrics", required=True, type=Path, help="per-step metrics JSONL")
    p.add_argument("--tensorboard-dir", type=Path, default=None, help="TensorBoard event dir")
    p.add_argument("--stats", required=True, type=Path, help="manifest JSON")
    p.add_argument("--debug-samples", type=Path, default=None, help="testing aid: per-rank sample ids per step")
    p.add_argument("--debug-step-delay-s", type=float, default=0.0, help="testing aid: sleep after each step")
    p.add_argument("--debug-spike-steps", default="", help="testing aid: comma-separated steps with loss x1000")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> Stats:
    cfg = from_dict(TrainStageConfig, params, "train stage")
    if args.debug_samples:
        args.debug_samples.mkdir(parents=True, exist_ok=True)
    hooks = DebugHooks(args.debug_samples, args.debug_step_delay_s,
                       tuple(int(s) for s in args.debug_spike_steps.split(",") if s.strip()))
    paths = TrainPaths(args.model, args.data, args.output_dir, args.checkpoint_dir, args.metrics, args.stats,
                       args.tensorboard_dir)
    return run(cfg, paths, hooks)


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", argv, build_parser, _run, "one continual pre-training stage (launch with torchrun)")


if __name__ == "__main__":
    sys.exit(main())
