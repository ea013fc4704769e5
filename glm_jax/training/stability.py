"""When to give up on the current weights: GLM-130B's training log is full of loss spikes
recovered by hand, by restarting from an earlier checkpoint and skipping the data that
caused them (MODEL.md §5). This watches each step and says when to do that.

A step is bad when its update was skipped (non-finite loss or gradient) or, with
``spike_factor`` set, when its loss exceeds ``spike_factor`` times the running average of
the good steps' losses. ``rollback_after`` consecutive bad steps ask for a rollback.
"""

from __future__ import annotations

import math


class SpikeMonitor:
    def __init__(self, rollback_after: int, spike_factor: float = 0.0, decay: float = 0.98):
        self.rollback_after = rollback_after
        self.spike_factor = spike_factor
        self.decay = decay
        self.average: float | None = None  # running average of good losses
        self.bad_streak = 0

    def is_spike(self, loss: float) -> bool:
        return bool(self.spike_factor) and self.average is not None and loss > self.spike_factor * self.average

    def observe(self, loss: float, skipped: bool) -> bool:
        """Record one step; True when it is time to roll back (and the streak restarts)."""
        bad = skipped or not math.isfinite(loss) or self.is_spike(loss)
        if not bad:
            self.bad_streak = 0
            self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
            return False
        self.bad_streak += 1
        if self.rollback_after and self.bad_streak >= self.rollback_after:
            self.bad_streak = 0
            return True
        return False
