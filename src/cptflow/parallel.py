"""Everything distributed: process group, attention kernel choice, and the DDP / DeepSpeed wrappers.

The training loop talks to an ``Engine`` with five verbs — ``accumulating(last)``, ``autocast()``,
``backward(share)``, ``step(lr, apply)``, ``save/load`` — so the loop reads the same for plain DDP
(CPU over gloo, or GPU over NCCL with torch autocast) and for DeepSpeed ZeRO-1/2/3 (GPU; the model is
cast to bf16/fp16 by DeepSpeed, fp32 master weights live in its optimizer). Processes are always
started by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment); a plain ``python -m`` run is
one process without a process group. DeepSpeed and flash-attn are imported only when chosen.

Loss normalisation: the loop passes each micro-batch's *share of the global mean*,
``sum_nll(micro) / target_tokens(global batch)``; summed over all micro-batches of all ranks that is
exactly the global mean. DDP averages gradients over ranks and DeepSpeed also divides by the
accumulation steps, so each engine rescales by what its framework divides by.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cptflow import modeling

log = logging.getLogger("cptflow.parallel")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank; 0 logs, writes outputs and checkpoints shared files
    local_rank: int  # rank on this node: picks the GPU
    world_size: int  # data-parallel processes
    device: torch.device
    backend: str | None  # None: single process, no process group


def init_distributed(deepspeed: bool = False) -> DistInfo:
    """Read torchrun's environment; start a process group when there is more than one process.

    DeepSpeed always gets a group (its engine needs one even for one process), started through
    ``deepspeed.init_distributed`` so that DeepSpeed's own comm layer knows the world size too.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = None
    if world > 1 or deepspeed:
        backend = "nccl" if cuda else "gloo"
        if deepspeed:
            import deepspeed as ds  # optional extra: pip install -e .[deepspeed]

            ds.init_distributed(dist_backend=backend)
        elif not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64: token counts and loss sums stay exact enough)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (the resume decision must be the same everywhere)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_attn(requested: str, device: torch.device, precision: str) -> str:
    """The attention kernel to load the model with; falls back from flash-attn and says so."""
    if requested not in ATTN:
        raise ValueError(f"attn: unknown value {requested!r}; allowed: {', '.join(ATTN)}")
    have_fa = importlib.util.find_spec("flash_attn") is not None
    usable = device.type == "cuda" and have_fa and precision in ("bf16", "fp16")
    if requested == "flash_attention_2" and not usable:
        raise ValueError("attn: flash_attention_2 needs a CUDA device, bf16/fp16 and the flash-attn package "
                         "(pip install -e .[gpu]); use attn: auto to fall back to sdpa")
    if requested != "auto":
        return requested
    if usable:
        return "flash_attention_2"
    if device.type == "cuda":
        log.warning("flash-attn %s: falling back to SDPA attention",
                    "not installed" if not have_fa else f"unusable with precision {precision}")
    return "sdpa"


def fill_deepspeed_config(raw: dict[str, Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill a ZeRO json's "auto" entries from the stage config; a conflicting explicit value is an error.

    ``values`` maps dotted keys (``bf16.enabled``) to what the stage config implies, so batch sizes,
    clipping and precision are set in one place (the stage config), never twice.
    """
    cfg = copy.deepcopy(raw)
    for dotted, value in values.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if leaf in node and node[leaf] != "auto" and node[leaf] != value:
            raise ValueError(f"{where}: {dotted} = {node[leaf]!r} conflicts with the stage config ({value!r}); "
                             f'set it to "auto"')
        node[leaf] = value
    # We pass a torch AdamW in; without this DeepSpeed refuses it under ZeRO (and never JIT-builds CPU Adam).
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def deepspeed_values(cfg: Any, micro: int, accum: int, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": float(cfg.grad_clip or 0.0),
        "bf16.enabled": cfg.precision == "bf16",
        "fp16.enabled": cfg.precision == "fp16",
    }


def load_deepspeed_config(path: str | Path, cfg: Any, micro: int, accum: int, world: int) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"deepspeed: config file {p} not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from e
    return fill_deepspeed_config(raw, deepspeed_values(cfg, micro, accum, world), str(p))


def zero3_load_context(ds_config: dict[str, Any]) -> Any:
    """Under ZeRO-3, make ``from_pretrained`` partition weights while loading (keep the object alive).

    Without it every rank would first materialise the whole model in CPU memory.
    """
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


class DDPEngine:
    """Plain PyTorch: DistributedDataParallel (when world > 1), AdamW, torch autocast."""

    zero_stage = 0

    def __init__(self, model: Any, cfg: Any, info: DistInfo):
        self.info = info
        self.module = model.to(info.device)
        self.model = self.module
        if info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if cfg.precision == "fp16" and info.device.type != "cuda":
            raise ValueError("precision: fp16 needs a CUDA device (no fp16 autocast on CPU); use bf16 or fp32")
        self.dtype = DTYPES[cfg.precision]
        self.grad_clip = cfg.grad_clip
        self.optimizer = torch.optim.AdamW(modeling.param_groups(self.module, cfg.weight_decay), lr=cfg.lr,
                                           betas=tuple(cfg.betas), eps=cfg.eps,
                                           fused=info.device.type == "cuda" or None)
        # fp16 without DeepSpeed: dynamic loss scaling keeps small gradients from flushing to zero.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Wrap forward+backward of one micro-batch: DDP syncs gradients only on the last one."""
        ctx = self.model.no_sync() if (not last and self.model is not self.module) else contextlib.nullcontext()
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
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

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

    def __init__(self, model: Any, cfg: Any, info: DistInfo, ds_config: dict[str, Any]):
        import deepspeed  # optional extra: pip install -e .[deepspeed]

        self.info = info
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.accum = int(ds_config["gradient_accumulation_steps"])
        self.base_optimizer = torch.optim.AdamW(modeling.param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                                betas=tuple(cfg.betas), eps=cfg.eps)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.base_optimizer, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.module = self.model.module

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
        """DeepSpeed cannot drop accumulated ZeRO gradients, so a skipped step runs with lr = 0:
        weights (and AdamW's decoupled decay) stay unchanged; Adam's moments still see the batch."""
        for g in self.base_optimizer.param_groups:
            g["lr"] = lr if apply else 0.0
        self.model.step()
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
            return self.model._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()
