"""FSDP2: PyTorch's own sharded data parallelism (``torch.distributed.fsdp.fully_shard``, torchtitan's base).

Each decoder layer is one FSDP unit, the rest (embeddings, final norm, lm_head) the root unit, as
torchtitan's ``parallelize_llama`` does: a layer's parameters are all-gathered just before it runs
and freed after (``fsdp_reshard_after_forward``; false keeps them until backward: more memory, less
communication, like ZeRO-2), gradients are reduce-scattered as soon as a layer's backward is done,
and AdamW holds only this rank's shard of every tensor (DTensors). Order of wrapping: activation
checkpointing and ``torch.compile`` per layer first (train.py, engines.compile_blocks), then FSDP.

Precision: ``bf16`` = ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: sharded fp32
master weights, bf16 all-gathers and compute, gradients reduced in fp32; ``fp32`` = no casts;
``fp16`` is refused (it would need a sharded gradient scaler). No torch autocast on top.

Checkpoints are torch.distributed.checkpoint (DCP) directories: every rank writes its shards with
their global placement, so a checkpoint written by N processes loads into any other number
(``get_state_dict``/``set_state_dict`` map optimizer state by parameter name). Over gloo (CPU), FSDP2
in torch 2.13 runs completely — all-gather, reduce-scatter, mixed precision, DCP — which is how
tests/train/test_fsdp.py checks it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from cptflow.train.optim import adamw, clip_and_step
from cptflow.train.parallel import DistInfo, compile_blocks


class FSDPEngine:
    """FSDP2 around a ``CausalLMLoss``: sharded parameters, gradients and optimizer state."""

    zero_stage = 0
    name = "FSDP2"
    any_world_size = True  # DCP reshards on load

    def __init__(self, loss_model: Any, cfg: Any, info: DistInfo):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if cfg.precision == "fp16":
            raise ValueError("engine fsdp: precision fp16 is not supported (it needs a sharded grad scaler); use bf16")
        self.info = info
        self.grad_clip = cfg.grad_clip
        lm = loss_model.lm.to(info.device)
        if cfg.compile:
            compile_blocks(lm)
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.precision == "bf16" else MixedPrecisionPolicy())
        for layer in lm.get_decoder().layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        fully_shard(loss_model, mesh=mesh, mp_policy=mp)
        self.model = loss_model
        self.module = lm
        self.optimizer = adamw(lm, cfg, fused=info.device.type == "cuda" or None)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        # Reduce-scatter after every micro-batch (FSDP2's default): holding unsharded gradients across
        # micro-batches would cost the memory sharding exists to save.
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters

    def backward(self, share: torch.Tensor) -> None:
        (share * self.info.world_size).backward()  # FSDP averages gradients over ranks: undo it

    def step(self, lr: float, apply: bool) -> float | None:
        if not apply:  # drop the (sharded) gradients, never call the optimizer: state stays bit-identical
            self.optimizer.zero_grad(set_to_none=True)
            return None
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return clip_and_step(self.optimizer, self.grad_clip)

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optim}

    def save(self, path: Path, rank: int) -> None:
        """Every rank writes its shards into ``path/dcp`` (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))  # reshards to this run's world size
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (collective: every rank must call), in the Hugging Face model's names."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("lm."): v for k, v in full.items()} if self.info.rank == 0 else None
