"""Learning-rate schedule as a pure function of the step (nanoGPT's ``get_lr``, torchtitan's warmup clamp).

The lr of update ``step`` (0-based) depends only on the step and a small frozen ``Schedule``, never on
an optimizer's internal counter: a resumed run recomputes exactly the lr the uninterrupted run used,
and the schedule needs no state in the checkpoint beyond the step itself.

Shape: linear warmup from ``lr / (warmup_steps + 1)`` up to ``lr`` over ``warmup_steps`` updates, then

* ``cosine``: half a cosine from ``lr`` down to ``min_lr`` at ``total_steps``;
* ``linear``: a straight line from ``lr`` down to ``min_lr`` at ``total_steps``;
* ``constant``: ``lr`` until the end (``min_lr`` unused).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "linear", "constant")

log = logging.getLogger("cptflow.train.schedule")


@dataclass(frozen=True)
class Schedule:
    """Everything ``lr_at`` needs; built once per stage by ``make_schedule``."""

    lr: float  # peak learning rate, reached at the end of warmup
    min_lr: float  # floor that cosine/linear decay reaches at total_steps
    warmup_steps: int  # updates of linear warmup (already clamped to total_steps)
    total_steps: int  # optimizer updates in the stage
    kind: str = "cosine"  # one of SCHEDULES

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule: unknown kind {self.kind!r}; allowed: {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"schedule: total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"schedule: warmup_steps must be in [0, total_steps], got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"schedule: need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")


def make_schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int, kind: str) -> Schedule:
    """Build a Schedule, clamping a warmup longer than the stage (with a warning, not a failure later)."""
    if warmup_steps > total_steps:
        log.warning("warmup_steps %d > total steps %d: clamped to %d", warmup_steps, total_steps, total_steps)
        warmup_steps = total_steps
    return Schedule(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind)


def lr_at(step: int, cfg: Schedule) -> float:
    """Learning rate for update ``step`` (0-based). Pure: same inputs, same float."""
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    # 1) warmup: start above zero (an lr of 0 would waste the first update entirely).
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.kind == "constant":
        return cfg.lr
    # 2) decay: progress 0 at the end of warmup, 1 at total_steps (never reached: last step is total-1).
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.kind == "linear":
        return cfg.lr - progress * (cfg.lr - cfg.min_lr)
    # 3) cosine: coefficient goes 1 -> 0 along half a period.
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
