"""The loss guard: a failure signal read from the training loss itself.

Where it sits: ``protect()`` (:mod:`recoverkit.session`) feeds each step's loss to a
:class:`LossGuard` through ``run.guard(loss)``; when the guard says the loss is bad, the run
rolls back to the last good snapshot and skips the offending batch. The guard only judges;
it knows nothing of checkpoints, batches or rollbacks.

A loss is bad when it is not finite (NaN, +-inf), or, with a ``spike_factor``, when it
exceeds ``spike_factor`` times the running average of the good losses seen so far (an
exponential moving average, weight ``ema_weight`` for the newest loss). Spikes are judged
only after ``warmup`` good losses, so the first steps' rapid fall never counts as one. A bad
loss does not enter the average.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LossGuard"]


class LossGuard:
    """Judges one loss per step: finite and not a spike, or bad.

    Args:
        spike_factor: reject a loss above this multiple of the running average (None:
            reject only non-finite losses).
        warmup: good losses to see before spikes are judged.
        ema_weight: the newest good loss's weight in the running average.

    Example:
        >>> guard = LossGuard(spike_factor=3.0, warmup=2)
        >>> [guard.check(x) for x in (1.0, 1.0, 2.5, 10.0, float("nan"), 1.0)]
        [True, True, True, False, False, True]
        >>> round(guard.average, 4), guard.seen
        (1.135, 4)
    """

    def __init__(
        self, *, spike_factor: float | None = None, warmup: int = 10, ema_weight: float = 0.1
    ) -> None:
        if spike_factor is not None and not spike_factor > 0:
            raise ValueError(f"spike_factor must be > 0 or None, got {spike_factor!r}")
        if not 0 < ema_weight <= 1:
            raise ValueError(f"ema_weight must be in (0, 1], got {ema_weight!r}")
        self.spike_factor = spike_factor
        self.warmup = warmup
        self.ema_weight = ema_weight
        #: running average of the good losses (None before the first)
        self.average: float | None = None
        #: good losses seen
        self.seen = 0

    def is_bad(self, value: float) -> bool:
        """Whether ``value`` would be rejected, without recording it."""
        if not math.isfinite(value):
            return True
        if self.spike_factor is None or self.average is None or self.seen < self.warmup:
            return False
        return value > self.spike_factor * self.average

    def check(self, loss: Any) -> bool:
        """True if ``loss`` (a number or a one-element tensor) is good, and record it;
        False if it is bad (not recorded)."""
        value = as_float(loss)
        if self.is_bad(value):
            return False
        w = self.ema_weight
        self.average = value if self.average is None else (1 - w) * self.average + w * value
        self.seen += 1
        return True


def as_float(loss: Any) -> float:
    """``loss`` as a Python float: a tensor is detached first (no autograd, no torch import)."""
    detach = getattr(loss, "detach", None)
    return float(detach() if callable(detach) else loss)
