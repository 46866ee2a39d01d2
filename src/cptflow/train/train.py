"""train/<stage>: one stage of continual pre-training (embed-align, full, replay, ...).

Reads top to bottom like nanoGPT's train.py: setup -> data -> model -> engine -> resume + loop ->
export. The update loop (shared with SFT's ``finetune``) lives in ``loop``, the engines in ``engines``
and ``fsdp``, processes in ``parallel``, packed attention in ``attention``, the chunked loss in
``loss``, the model in ``modeling``, checkpoints in ``checkpoint``, the lr in ``schedule``,
throughput/MFU in ``metrics``, the sample order and prefetching in ``train_data``.

Launch (always torchrun, never ``accelerate launch``; a plain ``python -m`` is one process)::

    torchrun --nproc_per_node N -m cptflow.train.train --model DIR --data DIR --output-dir DIR \\
        --checkpoint-dir DIR --metrics M.jsonl [--tensorboard-dir DIR] --stats S.json \\
        --params '<TrainStageConfig json>' --log-file L

Engines (``engine:``): DDP (CPU over gloo, GPU over NCCL; fp32 master weights, autocast), FSDP2
(``fully_shard``: sharded, bf16 compute with fp32 reduction, DCP checkpoints), DeepSpeed ZeRO-1/2/3
(``deepspeed: config/deepspeed/zero2.json``). Attention (``attn:``): documents of a packed row never
see each other at any micro-batch — sdpa block masks (CPU), FlexAttention document masks or
flash varlen over the flattened micro-batch (GPU); see ``cptflow.train.attention``.

Outputs (all written by rank 0 through a temporary name, then renamed):

* ``--output-dir``: HF model dir — model.safetensors (stored dtype of the input model), config.json,
  and the input's tokenizer/generation files copied unchanged;
* ``--metrics``: JSONL, one row per update: step, loss (global mean over target tokens), lr,
  grad_norm (pre-clip; null when skipped), tokens_per_s (real, non-padding tokens of all ranks;
  checkpoint time left out), tokens_seen (non-padding tokens so far), samples_seen, skipped, mfu
  (null without a known peak), data_wait_s (time the step waited for its batch from the prefetch
  thread), peak_mem_gib (CUDA: peak allocated memory so far; null on CPU);
* ``--tensorboard-dir``: TensorBoard events of the same scalars (empty when ``tensorboard: false``);
* ``--stats``: manifest (cptflow.core.stats.write_manifest) with counts and a ``summary`` block.

Checkpoints go to ``--checkpoint-dir`` (see cptflow.train.checkpoint); rerunning a stage whose job died
resumes from the last complete one. Keep that directory out of the rule's outputs: Snakemake deletes
the outputs of a failed job; multi-node runs need it on a shared file system. A rerun with a changed
setting that shapes the trajectory (lr, schedule, steps, data selection, seed, precision, ...) or a
re-made input starts afresh in a new ``run-<fingerprint>`` subdirectory; batch layout, kernels,
logging and checkpoint settings may change across a resume (the global batch may not).

Loss-spike guard (in ``cptflow.train.loop``): a step whose global loss exceeds ``loss_spike_factor`` x
the mean of the last ``loss_spike_window`` accepted losses (or is not finite) is *skipped*: its
gradients are dropped and the optimizer never runs, so weights and AdamW's moments and step count stay
bit-identical under every engine (``cptflow.train.optim``); the data still advances, it is counted
and logged. ``loss_spike_window`` consecutive skips abort the stage: that is a shift, not a spike.

Testing aids (flags, off by default): ``--debug-samples DIR`` (per-rank JSONL of sample ids per step),
``--debug-step-delay-s`` (sleep per step), ``--debug-spike-steps 3,7`` (loss x1000 on those steps).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptflow.model import modeling
from cptflow.train import attention, checkpoint, deepspeed_config, engines, loop, metrics, parallel
from cptflow.train import data as train_data
from cptflow.train.loop import DebugHooks
from cptflow.train.loss import CausalLMLoss
from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import atomic_path
from cptflow.train.schedule import make_schedule
from cptflow.core.stats import Stats, write_manifest
from cptflow.train.config import TrainStageConfig, plan_steps

VERSION = 2
log = logging.getLogger("cptflow.train.train")
# Settings that do not change the trajectory: a rerun with other values still resumes.
NOT_TRAJECTORY = {"name", "checkpoint_every", "keep_last", "log_every", "tensorboard", "peak_tflops", "attn",
                  "micro_batch_size", "grad_accum_steps", "global_batch_size", "gradient_checkpointing", "compile",
                  "loss_chunk_tokens", "prefetch_batches", "fsdp_reshard_after_forward"}


@dataclass(frozen=True)
class TrainPaths:
    model: Path  # input HF model dir
    data: Path  # packed dataset (datasets.save_to_disk)
    output_dir: Path  # final HF model dir
    checkpoint_dir: Path
    metrics: Path
    stats: Path
    tensorboard_dir: Path | None = None


def run(cfg: TrainStageConfig, paths: TrainPaths, hooks: DebugHooks = DebugHooks()) -> Stats:
    t0 = time.perf_counter()
    # ---- setup: processes, seeds, batch layout
    kind = engines.resolve_engine(cfg.engine, cfg.deepspeed)
    info = parallel.init_distributed(kind)
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
    # ---- model, loss and engine
    kernel = attention.resolve_kernel(cfg.attn, device, cfg.precision)
    attention.register()
    ds_config = deepspeed_config.load_deepspeed_config(cfg.deepspeed, cfg, cfg.micro_batch_size, accum, world) \
        if kind == "deepspeed" else None
    _keep = deepspeed_config.zero3_load_context(ds_config) if ds_config else None  # noqa: F841 (must stay alive)
    model = modeling.load_model(paths.model, attention.HF_IMPL[kernel])
    attention.check_model(model.config, length)
    n_train = modeling.set_trainable(model, cfg.trainable)
    if cfg.gradient_checkpointing:
        modeling.enable_gradient_checkpointing(model)
    n_matmul, (layers, hidden) = modeling.matmul_params(model), modeling.model_dims(model)
    engine = engines.build(kind, CausalLMLoss(model, kernel, cfg.loss_chunk_tokens), cfg, info, ds_config)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = metrics.peak_flops(dev_name if device.type == "cuda" else None, cfg.precision, cfg.peak_tflops)
    log.info("devices: %d x %s (%s), backend %s | precision %s | attention %s (%s) | %s | world size %d", world,
             dev_name, device.type, info.backend or "none", cfg.precision, kernel, attention.HF_IMPL[kernel],
             engine.name if world > 1 or kind != "ddp" else "single process", world)
    log.info("torch %s, transformers %s%s | compile %s | loss chunk %d tokens | prefetch %d batches",
             torch.__version__, _version("transformers"), f", deepspeed {_version('deepspeed')}" if ds_config else "",
             cfg.compile, cfg.loss_chunk_tokens, cfg.prefetch_batches)
    log.info("stage %s: %d steps x %d samples (micro %d x accum %d x world %d) x %d tokens; trainable %s: %d params; "
             "gradient checkpointing %s; MFU peak %s", cfg.name, total, gbatch, cfg.micro_batch_size, accum, world,
             length, cfg.trainable, n_train, cfg.gradient_checkpointing,
             f"{peak / 1e12:.0f} TFLOP/s" if peak else "n/a")
    # ---- resume from the last complete checkpoint of this very run (same params and inputs), then the
    # update loop (cptflow.train.loop: one global batch per update, spike guard, metrics, checkpoints)
    params = {k: v for k, v in to_dict(cfg).items() if k not in NOT_TRAJECTORY}
    rdir = checkpoint.run_dir(paths.checkpoint_dir, checkpoint.fingerprint({**params, "version": VERSION},
                                                                          [paths.model, paths.data]))
    flops_token = metrics.flops_per_token(n_matmul, layers, hidden, length)
    res = loop.run(engine, cfg, info, rdir,
                   lambda offset: train_data.read_batch(ds, order, offset, gbatch, rank, world, length, str(paths.data)),
                   total, gbatch, sched, hooks, flops_token, peak)
    state, meter = res.state, res.meter
    # ---- export: HF model dir, metrics, TensorBoard, manifest (rank 0; the others may exit: no
    # barrier after this, so hashing large inputs cannot run into a collective's timeout)
    weights = engine.export_state_dict()  # collective under ZeRO-3 and FSDP
    stats = Stats()
    if rank == 0:
        with atomic_path(paths.output_dir) as tmp:
            modeling.export_hf(engine.module, paths.model, tmp, modeling.stored_dtype(paths.model), weights)
        loop.write_logs(res.mlog, rdir, paths.metrics, paths.tensorboard_dir)
        for key in ("step", "samples_seen", "tokens_seen", "skipped_spike", "skipped_nonfinite"):
            stats.update(key, state[key])
        accepted_losses = loop.accepted_losses(res.mlog)
        summary = {"total_steps": total, "resumed_from_step": res.resumed_from, "world_size": world, "device": dev_name,
                   "precision": cfg.precision, "attention": kernel, "engine": kind, "zero_stage": engine.zero_stage,
                   "global_batch": gbatch, "grad_accum_steps": accum, "sample_length": length,
                   "trainable_params": n_train, "matmul_params": n_matmul, "flops_per_token": flops_token,
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
    p.add_argument("--data", required=True, type=Path, help="packed data: the pack index dir (cptflow.pack.packed_reader)")
    p.add_argument("--output-dir", required=True, type=Path, help="final HF model dir")
    DebugHooks.add_flags(p)  # --checkpoint-dir, --metrics, --tensorboard-dir, --stats, --debug-*


def _run(args: argparse.Namespace, params: dict[str, Any]) -> Stats:
    cfg = from_dict(TrainStageConfig, params, "train stage")
    hooks = DebugHooks.from_args(args)
    paths = TrainPaths(args.model, args.data, args.output_dir, args.checkpoint_dir, args.metrics, args.stats,
                       args.tensorboard_dir)
    return run(cfg, paths, hooks)


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", argv, build_parser, _run, "one continual pre-training stage (launch with torchrun)")


if __name__ == "__main__":
    sys.exit(main())
