"""AdamW for every engine, a step that can be declined (the spike guard), and clipping that works on shards.

``SkippableAdamW`` exists for DeepSpeed, which calls ``optimizer.step()`` itself at its accumulation
boundary: setting ``skip`` makes that call a no-op, so a skipped update leaves the moments, the step
count and the fp32 master weights bit-identical (an lr of 0 would not: Adam's moments and step count
would still absorb the spike). DDP and FSDP simply never call ``step()`` on a skipped update.
"""

from __future__ import annotations

from typing import Any

import torch

from cptflow.model import modeling


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose ``step()`` does nothing while ``skip`` is set (for engines that call step themselves)."""

    skip = False

    def step(self, closure: Any = None) -> Any:
        if self.skip:
            return None
        return super().step(closure)


def adamw(model: Any, cfg: Any, fused: bool | None) -> SkippableAdamW:
    """AdamW over the trainable parameters of ``model`` (decay groups from ``modeling.param_groups``)."""
    return SkippableAdamW(modeling.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                          eps=cfg.eps, fused=fused)


def clip_and_step(optimizer: torch.optim.Optimizer, grad_clip: float | None, scaler: Any = None) -> float:
    """Clip the global grad norm (sharded parameters included) and apply; returns the pre-clip norm."""
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor (a reduction over all shards); the same on every rank
        norm = norm.full_tensor()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
