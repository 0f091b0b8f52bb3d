"""The handle ``save_async`` returns (``recoverkit.SaveHandle``): events per stage, metrics,
and the error if any. The drain thread (``staging.pipeline``) sets its events; the user waits."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from .metrics import SaveMetrics

__all__ = ["SaveHandle"]


class SaveHandle:
    """What :meth:`Checkpointer.save_async <recoverkit.Checkpointer.save_async>` returns:
    one asynchronous save, followed stage by stage (public as ``recoverkit.SaveHandle``).

    Attributes:
        step: the step being saved.
        tiers: the tiers the tier policy sends this step to, fastest first (empty: host
            memory only).
        staged: an Event, set once every byte is copied to host memory (the saved tensors
            may change from then on).
        durable: tier name -> an Event, set once the step is committed on that tier.
        committed: an Event, set once every scheduled tier is done, or the save failed.
        committed_to: the tiers that really hold the step (``durable`` is also set on
            failure, so no waiter hangs; this list is not).
        superseded: tier -> the newer step written there instead of this one (one-process
            jobs whose disk is slower than the save interval). ``durable`` of such a tier is
            never set; ``committed`` is set (or the error) when the newer save settles,
            since that is when this state is covered by a durable step.
        skipped: the staging pool was full and the save was skipped (it fails).
        error: the failure (a :class:`~recoverkit.CommitError`, or the staging fault), or None.
        metrics: ``call_s`` (blocking time in the call), ``prestep_wait_s`` (time the
            optimizer hook waited), ``staging_s``, ``durable_s/<tier>`` and ``bytes``.

    A failed save sets ``error``, then ``committed`` and every ``durable`` event: ``wait``
    raises the error, and ``Checkpointer.wait()``/``close()`` report it too unless this
    handle's ``wait`` already raised it.

    Example:
        >>> import tempfile, torch, recoverkit
        >>> with recoverkit.Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     handle = ckpt.save_async(7, {"w": torch.ones(4)})
        ...     handle.wait(timeout_s=60), handle.done(), handle.committed_to
        (True, True, ['local'])
        >>> handle
        SaveHandle(step=7, committed, tiers=['local'])
        >>> handle.durable["local"].is_set(), handle.metrics["bytes"] > 0
        (True, True)
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
        #: what the save did and how long each part took (:class:`SaveMetrics`: read-only)
        self.metrics = SaveMetrics()

    def done(self) -> bool:
        """Whether the save is settled (committed everywhere due, or failed); never blocks."""
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
