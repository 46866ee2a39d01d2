"""The engines the training loop talks to: DDP, FSDP2 (``cptflow.train.fsdp``) and DeepSpeed ZeRO.

The training loop talks to an ``Engine`` with a few verbs — ``model(**micro)`` (the summed loss),
``accumulating(last)``, ``autocast()``, ``backward(share)``, ``step(lr, apply)``, ``save/load``,
``export_state_dict()`` — so the loop reads the same for

* ``ddp``: plain PyTorch DistributedDataParallel (CPU over gloo, GPU over NCCL), fp32 master weights
  with torch autocast; replicated weights, so its checkpoints resume on any number of processes;
* ``fsdp``: PyTorch's FSDP2 (``fully_shard``): parameters, gradients and AdamW state sharded over the
  processes, bf16 compute with fp32 gradient reduction, torch.distributed.checkpoint (any world size);
* ``deepspeed``: DeepSpeed ZeRO-1/2/3 from a json (GPU; CPU over gloo in the tests).

Every engine wraps a ``cptflow.train.loss.CausalLMLoss`` (``.module`` is the Hugging Face model in
it). Processes are always started by ``torchrun``; DeepSpeed is imported only when chosen.

Loss normalisation: the loop passes each micro-batch's *share of the global mean*,
``sum_nll(micro) / target_tokens(global batch)``; summed over all micro-batches of all ranks that is
exactly the global mean. DDP and FSDP average gradients over ranks and DeepSpeed also divides by
the accumulation steps, so each engine rescales by what its framework divides by.

A skipped step (the spike guard) leaves weights AND optimizer state (moments, step count)
bit-identical under every engine: DDP and FSDP drop the gradients and never call the optimizer;
DeepSpeed calls the optimizer itself at its accumulation boundary, so it gets a
``cptflow.train.optim.SkippableAdamW`` whose ``step()`` declines while ``skip`` is set (DeepSpeed then
copies the unchanged fp32 master weights back into the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cptflow.train.optim import adamw, clip_and_step
from cptflow.train.parallel import DTYPES, DistInfo, compile_blocks

ENGINES = ("auto", "ddp", "fsdp", "deepspeed")


def resolve_engine(requested: str, deepspeed: str | None) -> str:
    """auto = deepspeed when a ZeRO json is named, else ddp (TrainStageConfig checks the combinations)."""
    if requested not in ENGINES:
        raise ValueError(f"engine: unknown value {requested!r}; allowed: {', '.join(ENGINES)}")
    return ("deepspeed" if deepspeed else "ddp") if requested == "auto" else requested


class DDPEngine:
    """Plain PyTorch: DistributedDataParallel (when world > 1), AdamW, torch autocast."""

    zero_stage = 0
    name = "DDP"
    any_world_size = True  # replicated weights: its checkpoints resume on any number of processes

    def __init__(self, loss_model: Any, cfg: Any, info: DistInfo):
        self.info = info
        self.module = loss_model.lm.to(info.device)  # the Hugging Face model: saved, exported
        self.model = loss_model
        if cfg.compile:
            compile_blocks(self.module)
        if info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(loss_model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if cfg.precision == "fp16" and info.device.type != "cuda":
            raise ValueError("precision: fp16 needs a CUDA device (no fp16 autocast on CPU); use bf16 or fp32")
        self.dtype = DTYPES[cfg.precision]
        self.grad_clip = cfg.grad_clip
        self.optimizer = adamw(self.module, cfg, fused=info.device.type == "cuda" or None)
        # fp16 without DeepSpeed: dynamic loss scaling keeps small gradients from flushing to zero.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Wrap forward+backward of one micro-batch: DDP syncs gradients only on the last one."""
        ctx = self.model.no_sync() if (not last and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
        with ctx:
            yield

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.dtype)

    def backward(self, share: torch.Tensor) -> None:
        loss = share * self.info.world_size  # DDP averages over ranks; we want the sum of shares
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr: float, apply: bool) -> float | None:
        """Clip and apply (returns the pre-clip grad norm), or drop this step's gradients entirely."""
        if not apply:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return clip_and_step(self.optimizer, self.grad_clip, self.scaler)

    def save(self, path: Path, rank: int) -> None:
        """Rank 0 writes the (replicated) weights and optimizer state."""
        if rank != 0:
            return
        from safetensors.torch import save_model

        save_model(self.module, str(path / "model.safetensors"))  # handles tied weights
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None}, path / "optimizer.pt")

    def load(self, path: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.module, str(path / "model.safetensors"), strict=True, device=str(self.info.device))
        state = torch.load(path / "optimizer.pt", map_location=self.info.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.module.state_dict()


class DeepSpeedEngine:
    """DeepSpeed ZeRO: ``deepspeed.initialize`` with our AdamW and the filled json config.

    Meant for GPUs; also runs on CPU over gloo (fp32), which is how tests/test_deepspeed.py checks it."""

    name = "DeepSpeed"
    any_world_size = False  # ZeRO partitions are tied to the world size that wrote them

    def __init__(self, loss_model: Any, cfg: Any, info: DistInfo, ds_config: dict[str, Any]):
        import deepspeed  # optional extra: pip install -e .[deepspeed]

        if cfg.compile:
            raise ValueError("compile: not supported with engine deepspeed; use ddp or fsdp")
        self.info = info
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.name = f"DeepSpeed ZeRO-{self.zero_stage}"
        self.accum = int(ds_config["gradient_accumulation_steps"])
        lm = loss_model.lm
        if self.zero_stage == 3:  # the loss uses lm_head's weight outside lm_head's forward: ZeRO-3 must gather it
            deepspeed.zero.register_external_parameter(loss_model, lm.get_output_embeddings().weight)
        self.base_optimizer = adamw(lm, cfg, fused=None)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=loss_model, optimizer=self.base_optimizer, config=ds_config,
            model_parameters=[p for p in loss_model.parameters() if p.requires_grad])
        self.module = self.model.module.lm

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        self.last = last  # DeepSpeed syncs at its own boundary; we only need to know when not to step yet
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine runs the model in bf16/fp16 already

    def backward(self, share: torch.Tensor) -> None:
        # DeepSpeed divides by the accumulation steps and averages over ranks: undo both.
        self.model.backward(share * self.info.world_size * self.accum)
        if not self.last:  # the boundary step happens in step(), once the lr and the spike verdict are known
            self.model.step()

    def step(self, lr: float, apply: bool) -> float | None:
        """The boundary step; when skipped, our AdamW declines DeepSpeed's call (state unchanged)."""
        for g in self.base_optimizer.param_groups:
            g["lr"] = lr
        self.base_optimizer.skip = not apply
        try:
            self.model.step()
        finally:
            self.base_optimizer.skip = False
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None and apply else None

    def save(self, path: Path, rank: int) -> None:
        self.model.save_checkpoint(str(path), tag="deepspeed", save_latest=False)  # every rank writes its shard

    def load(self, path: Path) -> None:
        load_path, _ = self.model.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if load_path is None:
            raise ValueError(f"{path}: DeepSpeed found no checkpoint to load")

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage == 3:  # partitioned weights: gather (every rank must call), rank 0 gets them
            full = self.model._zero3_consolidated_16bit_state_dict()
            return {k.removeprefix("lm."): v for k, v in full.items()} if full is not None else None
        return self.module.state_dict()


def build(kind: str, loss_model: Any, cfg: Any, info: DistInfo, ds_config: dict[str, Any] | None) -> Any:
    """The engine ``kind`` (from ``resolve_engine``) around ``loss_model``."""
    if kind == "deepspeed":
        return DeepSpeedEngine(loss_model, cfg, info, ds_config or {})
    if kind == "fsdp":
        from cptflow.train.fsdp import FSDPEngine

        return FSDPEngine(loss_model, cfg, info)
    return DDPEngine(loss_model, cfg, info)
