"""Which tiers a step goes to: the schedules of ``CheckpointOptions.tiers``, in list order.

Both saves ask the same :class:`Schedule`, once per save, so the blocking save and the
drain follow one schedule. Step-count schedules are the same on every rank by
construction; a time schedule (``every_s``) is decided by rank 0 and shared with every rank
(:func:`~recoverkit.staging.agreement.agree_value`), so every rank commits the same steps
to the same tiers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

from ..config import TierSpec
from ..distributed.coordinator import Coordinator
from .agreement import agree_value

__all__ = ["Schedule"]


class Schedule:
    """The tiers due for each step, fastest first.

    Example:
        >>> from recoverkit.config import TierSpec
        >>> from recoverkit.distributed.coordinator import LocalCoordinator
        >>> s = Schedule([TierSpec.host(), TierSpec.local(every_steps=2)], coordinator=LocalCoordinator(), scope="doc")
        >>> s.due(3), s.due(4)
        (('host',), ('host', 'local'))
    """

    def __init__(
        self,
        specs: Sequence[TierSpec],
        *,
        coordinator: Coordinator,
        scope: str,
        timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.specs = tuple(specs)
        self.coordinator = coordinator
        self.scope = scope
        self.timeout_s = timeout_s
        self.clock = clock
        self._timed = any(s.every_s is not None for s in self.specs)
        self._last: dict[str, float] = {}  # tier -> when it was last due (time schedules)
        self._lock = threading.Lock()
        self._calls = itertools.count()

    def due(self, step: int) -> tuple[str, ...]:
        """The names of the tiers ``step`` goes to (every rank calls it once per save)."""
        if not self._timed:
            return tuple(s.name for s in self.specs if s.due(step))
        with self._lock:
            now = self.clock()
            names = tuple(
                s.name
                for s in self.specs
                if s.due(
                    step, since_s=None if s.name not in self._last else now - self._last[s.name]
                )
            )
            if self.coordinator.world_size > 1:
                scope = f"{self.scope}/{next(self._calls)}"
                names = tuple(
                    agree_value(
                        self.coordinator, scope, {"due": list(names)}, timeout_s=self.timeout_s
                    )["due"]
                )
            for name in names:
                self._last[name] = now
            return names
