"""The handle ``save_async`` returns: events per stage, metrics, and the error if any."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["SaveHandle"]


class SaveHandle:
    """Tracks one asynchronous save.

    Events: ``staged`` (every byte copied to host memory), ``durable[tier]`` (written and
    committed on that tier), ``committed`` (every scheduled tier done, or failed).
    ``superseded`` maps a tier to the newer step written there instead of this one
    (one-process jobs whose disk is slower than the save interval): ``durable`` of such a
    tier is never set, and ``committed`` is set (or the error) when the newer save settles,
    since that is when this state is covered by a durable step.
    ``metrics`` holds ``call_s`` (blocking time in the call), ``prestep_wait_s`` (time the
    optimizer hook waited), ``staging_s``, ``durable_s/<tier>`` and ``bytes``.

    A failed save sets ``error`` (a :class:`~recoverkit.CommitError`, or the staging
    fault), then ``committed`` and every ``durable`` event so no waiter hangs: ``wait``
    raises the error, and ``Checkpointer.wait()``/``close()`` report it too unless this
    handle's ``wait`` already raised it. ``committed_to`` names the tiers that really hold
    the step.

    Example:
        >>> h = SaveHandle(7, tiers=["local"])
        >>> h.done()
        False
    """

    def __init__(self, step: int, *, tiers: Iterable[str]) -> None:
        self.step = step
        self.tiers = tuple(tiers)
        self.staged = threading.Event()
        self.durable = {t: threading.Event() for t in self.tiers}
        self.committed = threading.Event()
        self.error: BaseException | None = None
        self.skipped = False
        self.superseded: dict[str, int] = {}
        #: tiers this step was committed to (``durable`` is also set on failure)
        self.committed_to: list[str] = []
        self._reported = False  # the error was raised to the user by ``wait``
        self._snapshot: Any = None  # its host snapshot (the pipeline's business)
        self._dropped = False  # freed before the drain reached it (the pipeline's business)
        self._followers: list[SaveHandle] = []  # superseded saves settled with this one
        self.metrics: dict[str, Any] = {}

    def done(self) -> bool:
        return self.committed.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every scheduled tier is done; raise the save's error if it failed.

        Returns False if ``timeout_s`` passed first.
        """
        if not self.committed.wait(timeout_s):
            return False
        if self.error is not None:
            self._reported = True
            raise self.error
        return True

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.staged.set()
        for e in self.durable.values():
            e.set()
        self.committed.set()

    def __repr__(self) -> str:
        state = "failed" if self.error else "committed" if self.done() else "staged" if self.staged.is_set() else "staging"
        return f"SaveHandle(step={self.step}, {state}, tiers={list(self.tiers)})"
