"""The loss-spike guard of the training loop: accept or skip a step from its loss (state is plain data).

A step whose global loss exceeds ``factor`` x the mean of the last ``window`` accepted losses (or is not
finite) is skipped: we skip rather than roll back, since a rollback replays the same batches and spikes
again. ``window`` consecutive skips raise: that is a shift, not a spike.
"""

from __future__ import annotations

import math


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
