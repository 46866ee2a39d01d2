"""Stage ``finetune``: supervised fine-tuning of a CPT model on packed conversations — LoRA, QLoRA or full.

The training stage's parts, used as they are, so SFT runs, resumes and scales like CPT: torchrun
processes (``cptflow.train.parallel``), the engines (``engines.build``: DDP, FSDP2, DeepSpeed ZeRO),
the chunked loss (``train.loss.CausalLMLoss``: summed next-token cross-entropy over the labels, which
are -100 off the assistant turns), the packed-attention masks (``train.attention``: no token sees
another conversation of its row, at any micro-batch), the sample order and prefetcher
(``train.data``), and the update loop itself (``train.loop``: the global-mean loss, the spike guard,
metrics, checkpoints with the data position — a run killed at any point resumes from its last
checkpoint at the same sample). What LoRA wraps and how adapters merge is ``cptflow.sft.lora``; the
data format is ``cptflow.sft.packed``.

Under DDP a LoRA checkpoint holds only what trains (``SftDDPEngine``: the adapter and its optimizer
state, MBs, not the frozen base); FSDP2 and DeepSpeed write their own sharded checkpoints of the
whole module. QLoRA (a 4-bit base per process) runs under DDP only.

Launch (``python -m cptflow.train.launch --module cptflow.sft.finetune -- <flags>``, or torchrun)::

    --model DIR [--model-manifest M] --data DIR --template FILE [--data-manifest M] --output-dir DIR
    [--adapter-dir DIR] --checkpoint-dir DIR --metrics M.jsonl [--tensorboard-dir DIR] --stats S.json
    --params '<FinetuneConfig json>'

Outputs (rank 0, each through a temporary name): ``--output-dir`` the full model (adapter merged), with
the chat template installed in its tokenizer; ``--adapter-dir`` (LoRA/QLoRA) the adapter alone; metrics
(the training stage's columns, so the report plots them together), TensorBoard, the manifest.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import atomic_path
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, write_manifest
from cptflow.model import modeling
from cptflow.sft import lora, packed
from cptflow.sft.config import FinetuneConfig
from cptflow.sft.template import install_template, template_sha256
from cptflow.train import attention, checkpoint, deepspeed_config, engines, loop, metrics, parallel
from cptflow.train import data as train_data
from cptflow.train.config import TrainStageConfig
from cptflow.train.loop import DebugHooks
from cptflow.train.loss import CausalLMLoss
from cptflow.train.schedule import make_schedule

VERSION = 2  # 2: the training stage's loss, masks, engines and loop; spike guard
log = logging.getLogger("cptflow.sft.finetune")
# Settings that do not change the trajectory: a rerun with other values still resumes.
NOT_TRAJECTORY = {"checkpoint_every", "keep_last", "log_every", "tensorboard", "micro_batch_size", "grad_accum_steps",
                  "global_batch_size", "gradient_checkpointing", "attn", "compile", "loss_chunk_tokens",
                  "prefetch_batches", "fsdp_reshard_after_forward", "peak_tflops"}


@dataclass(frozen=True)
class FinetunePaths:
    model: Path  # the model SFT starts from (a CPT stage's output)
    data: Path  # sft_pack's dataset
    template: Path  # sft_pack's chat template
    output_dir: Path  # merged full model
    checkpoint_dir: Path
    metrics: Path
    stats: Path
    adapter_dir: Path | None = None  # LoRA/QLoRA: the adapter alone
    tensorboard_dir: Path | None = None
    model_manifest: Path | None = None  # the producers' manifests: inputs are checked against them
    data_manifest: Path | None = None


class SftDDPEngine(engines.DDPEngine):
    """The DDP engine, checkpointing only trainable tensors: a LoRA checkpoint is MBs, not the frozen base."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def save(self, path: Path, rank: int) -> None:
        if rank != 0:
            return
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable().items()},
                  str(path / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None}, path / "optimizer.pt")

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        saved, mine = load_file(str(path / "trainable.safetensors"), device=str(self.info.device)), self.trainable()
        if saved.keys() != mine.keys():
            raise ValueError(f"{path}: checkpoint trains {len(saved)} tensors, this run {len(mine)}")
        with torch.no_grad():
            for n, p in mine.items():
                p.copy_(saved[n])
        state = torch.load(path / "optimizer.pt", map_location=self.info.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def plan_total(cfg: FinetuneConfig, n_rows: int, global_batch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * n_rows / global_batch))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_inputs(paths: FinetunePaths) -> None:
    """The start model and the packed data are what their producers' manifests recorded (rank 0 reads)."""
    verify_inputs([paths.model], [paths.model_manifest] if paths.model_manifest else [])
    verify_inputs([paths.data, paths.template], [paths.data_manifest] if paths.data_manifest else [])


def run(cfg: FinetuneConfig, paths: FinetunePaths, hooks: DebugHooks = DebugHooks()) -> Stats:
    t0 = time.perf_counter()
    # ---- setup: processes, batch layout, data order, schedule
    kind = engines.resolve_engine(cfg.engine, cfg.deepspeed)
    info = parallel.init_distributed(kind)
    rank, world, device = info.rank, info.world_size, info.device
    if rank == 0:
        check_inputs(paths)
    parallel.barrier()
    accum, gbatch = TrainStageConfig(name="sft", micro_batch_size=cfg.micro_batch_size,
                                     grad_accum_steps=cfg.grad_accum_steps,
                                     global_batch_size=cfg.global_batch_size).batch_layout(world)
    ds, length = packed.open_rows(paths.data)
    order = train_data.SampleOrder(np.arange(len(ds)), np.zeros(len(ds), np.int64), cfg.seed)
    total = plan_total(cfg, order.n, gbatch)
    sched = make_schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, total, cfg.schedule)
    # ---- model: the same LoRA initialisation on every rank and world size, then per-rank dropout streams
    kernel = attention.resolve_kernel(cfg.attn, device, cfg.precision)
    attention.register()
    method = lora.resolve_method(cfg, device)
    ds_config = deepspeed_config.load_deepspeed_config(cfg.deepspeed, cfg, cfg.micro_batch_size, accum, world) \
        if kind == "deepspeed" else None
    _keep = deepspeed_config.zero3_load_context(ds_config) if ds_config else None  # noqa: F841 (must stay alive)
    _seed(cfg.seed)
    # Sharding engines hold every weight in fp32 and cast on the fly (one dtype per sharded unit).
    model, peft_model, n_train = lora.prepare(paths.model, cfg, method, attention.HF_IMPL[kernel], device,
                                              hold_frozen_in_precision=kind == "ddp")
    attention.check_model(model.config, length)
    n_all = sum(p.numel() for p in model.parameters())
    n_matmul, (layers, hidden) = modeling.matmul_params(model), modeling.model_dims(model)
    _seed(cfg.seed + rank)
    loss_model = CausalLMLoss(model, kernel, cfg.loss_chunk_tokens)
    engine = SftDDPEngine(loss_model, cfg, info) if kind == "ddp" else \
        engines.build(kind, loss_model, cfg, info, ds_config)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # MFU's 6N counts a weight gradient for every weight: meaningful for full fine-tuning only.
    peak = metrics.peak_flops(dev_name if device.type == "cuda" else None, cfg.precision, cfg.peak_tflops) \
        if method == "full" else None
    log.info("sft: method %s%s, %d of %d parameters train (%.2f%%) | %d steps x %d rows (micro %d x accum %d x "
             "world %d) x %d tokens | %s, backend %s, %s | precision %s | attention %s (%s)", method,
             f" (requested {cfg.method})" if method != cfg.method else "", n_train, n_all, 100 * n_train / n_all,
             total, gbatch, cfg.micro_batch_size, accum, world, length, dev_name, info.backend or "none",
             engine.name if world > 1 or kind != "ddp" else "single process", cfg.precision, kernel,
             attention.HF_IMPL[kernel])
    # ---- resume from the last complete checkpoint of this very run, then the training stage's loop
    params = {k: v for k, v in to_dict(cfg).items() if k not in NOT_TRAJECTORY}
    fp = checkpoint.fingerprint({**params, "version": VERSION, "method": method}, [paths.model, paths.data])
    rdir = checkpoint.run_dir(paths.checkpoint_dir, fp)
    res = loop.run(engine, cfg, info, rdir,
                   lambda offset: packed.read_batch(ds, order, offset, gbatch, rank, world, length, str(paths.data)),
                   total, gbatch, sched, hooks, metrics.flops_per_token(n_matmul, layers, hidden, length), peak)
    state = res.state
    # ---- export (rank 0): merged model, adapter, metrics, manifest
    weights = engine.export_state_dict()  # collective under ZeRO-3 and FSDP
    stats = Stats()
    if rank == 0:
        template = paths.template.read_text(encoding="utf-8")
        export(engine, peft_model, paths, template, weights)
        loop.write_logs(res.mlog, rdir, paths.metrics, paths.tensorboard_dir)
        for key in ("step", "samples_seen", "tokens_seen", "target_tokens_seen", "skipped_spike", "skipped_nonfinite"):
            stats.update(key, state[key])
        losses = loop.accepted_losses(res.mlog)
        summary = {"method_requested": cfg.method, "method": method, "engine": kind, "zero_stage": engine.zero_stage,
                   "trainable_params": n_train, "params": n_all, "total_steps": total,
                   "resumed_from_step": res.resumed_from, "world_size": world, "device": dev_name,
                   "precision": cfg.precision, "attention": kernel, "global_batch": gbatch, "grad_accum_steps": accum,
                   "row_length": length, "final_loss": float(np.mean(losses[-5:])) if losses else None,
                   "tokens_per_s_mean": res.meter.mean_tokens_per_s() if res.meter.steps_total else None,
                   "chat_template_sha256": template_sha256(template), "start_model": str(paths.model),
                   "checkpoint_run_dir": str(rdir)}
        outputs = [paths.output_dir, paths.metrics] + ([paths.adapter_dir] if peft_model is not None else [])
        write_manifest(paths.stats, stage="finetune", version=VERSION, params=to_dict(cfg),
                       inputs=[paths.model, paths.data, paths.template], stats=stats,
                       seconds=time.perf_counter() - t0, outputs=outputs, extra={"summary": summary})
        log.info("finetune done: %d steps (%d skipped), %d target tokens -> %s", state["step"],
                 state["skipped_spike"] + state["skipped_nonfinite"], state["target_tokens_seen"], paths.output_dir)
    parallel.shutdown()
    return stats


def export(engine: Any, peft_model: Any, paths: FinetunePaths, template: str,
           weights: dict[str, torch.Tensor] | None) -> None:
    """The adapter alone (LoRA/QLoRA) and the full model, both carrying the chat template they were trained with.

    ``weights`` is the engine's full state dict (gathered from the shards under FSDP2 / ZeRO-3), in the
    Hugging Face model's names; the adapter is taken from it, so every engine exports the same way.
    """
    with atomic_path(paths.output_dir) as tmp:
        if peft_model is None:
            modeling.export_hf(engine.module, paths.model, tmp, modeling.stored_dtype(paths.model), weights)
        else:
            if paths.adapter_dir is None:
                raise ValueError("a LoRA run needs --adapter-dir")
            lora.save_adapter(peft_model, paths.adapter_dir, str(paths.model), template, weights)
            n = lora.merge_adapter(paths.model, paths.adapter_dir, tmp)
            log.info("merged %d adapted weights into %s", n, paths.output_dir)
        install_template(tmp, template)


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model to fine-tune (a CPT stage's output)")
    p.add_argument("--model-manifest", type=Path, default=None, help="manifest of the stage that wrote --model")
    p.add_argument("--data", required=True, type=Path, help="sft_pack dataset")
    p.add_argument("--template", required=True, type=Path, help="sft_pack chat template (.jinja)")
    p.add_argument("--data-manifest", type=Path, default=None, help="sft_pack's manifest (--data, --template)")
    p.add_argument("--output-dir", required=True, type=Path, help="merged full model dir")
    p.add_argument("--adapter-dir", type=Path, default=None, help="adapter dir (LoRA/QLoRA)")
    DebugHooks.add_flags(p)  # --checkpoint-dir, --metrics, --tensorboard-dir, --stats, --debug-*


def _run(args: argparse.Namespace, params: dict[str, Any]) -> Stats:
    cfg = from_dict(FinetuneConfig, params, "sft.finetune")
    paths = FinetunePaths(args.model, args.data, args.template, args.output_dir, args.checkpoint_dir, args.metrics,
                          args.stats, args.adapter_dir, args.tensorboard_dir, args.model_manifest, args.data_manifest)
    hooks = DebugHooks.from_args(args)
    return run(cfg, paths, hooks)


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune", argv, build_parser, _run, "supervised fine-tuning (launch with torchrun)")


if __name__ == "__main__":
    sys.exit(main())
