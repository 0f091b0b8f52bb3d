"""The lazy asynchronous save path: stage in the call, drain in the background.

::

    save_async(step)  plan -> Stager: pool ranges (back-pressure), eager copies now, lazy
                      copies submitted to the engine -> handle           (returns at once)
    next step of each hooked target: the guard waits only for its lazy copies
    Drain thread:     staged -> Committer: each commit tier due -> settled
                      -> the snapshot tiers due keep the snapshot (the host cache)

This module only wires the stages together; each lives in its own module (``stager``,
``drain``, ``committer``, ``host_tier``, ``guard``). The commit path is the Checkpointer's
one :class:`~recoverkit.staging.committer.Committer`, injected: nothing here calls back
into the Checkpointer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import StagingPolicy
from ..errors import PoolExhaustedError
from ..storage.base import Tier
from .base import SnapshotTier, StepHooks
from .committer import Committer
from .drain import Drain, DrainJob
from .guard import StepGuard
from .handle import SaveHandle
from .plan import SavePlan
from .stager import Stager

__all__ = ["AsyncPipeline"]


class AsyncPipeline:
    """The stager, the guard and the drain of one Checkpointer.

    Args:
        engine: the copy engine's module (its ``StagingPool`` and ``CopyEngine``).
        staging: the pool's size and what to do when it is full.
        committer: the one commit path (shared with the blocking save).
        snapshot_tiers: every snapshot tier (withdrawn from when a save fails).
        rank: this process's rank.
        hooks: where the pre-step wait is installed (default: torch optimizers).
        coalesce: supersede older saves in a one-process job (see ``staging.drain``).
    """

    def __init__(
        self, *, engine: Any, staging: StagingPolicy, committer: Committer, snapshot_tiers: Sequence[SnapshotTier],
        rank: int, hooks: StepHooks | None = None, coalesce: bool = False,
    ) -> None:
        self.rank = rank
        self.guard = StepGuard(hooks)
        self.stager = Stager(engine=engine, policy=staging, guard=self.guard)
        self.snapshot_tiers = list(snapshot_tiers)
        self.drain = Drain(
            committer=committer, guard=self.guard, snapshot_tiers=self.snapshot_tiers, rank=rank, coalesce=coalesce
        )
        self._inflight: list[SaveHandle] = []
        self._closed = False

    @property
    def pool(self) -> Any:
        """The staging pool (host memory every snapshot lives in)."""
        return self.stager.pool

    @property
    def skipped(self) -> int:
        """Saves skipped because the staging pool was full."""
        return self.stager.skipped

    def submit(
        self, step: int, plan: SavePlan, targets: Sequence[Any], user_meta: Mapping[str, Any], *,
        tiers: Sequence[Tier], keep_in: Sequence[SnapshotTier],
    ) -> SaveHandle:
        """Stage ``plan`` now (lazily) and queue it for ``tiers``, then ``keep_in``."""
        handle = SaveHandle(step, tiers=[t.name for t in tiers])
        metrics = handle.metrics

        def make_room() -> bool:
            return any(t.evict_one() for t in self.snapshot_tiers) or self.drain.drop_waiting(handle)

        snap = self.stager.stage(step, plan, targets, metrics, make_room, keep_in=keep_in)
        handle._snapshot = snap
        skip_error = None
        if snap is None:
            handle.skipped = True  # logged when it fails, in the drain (once)
            metrics.called(call_s=time.perf_counter() - metrics.started)
            skip_error = PoolExhaustedError(
                f"step {step} skipped on rank {self.rank}: staging pool full ({self.skipped} saves skipped so far)"
            )
        self._inflight = [h for h in self._inflight if not h.done()] + [handle]
        self.drain.put(DrainJob(handle, snap, plan, user_meta, list(tiers), list(keep_in), skip_error))
        return handle

    def take_failed(self) -> list[SaveHandle]:
        return self.drain.take_failed()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted save is settled; False if ``timeout_s`` passed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for h in list(self._inflight):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not h.committed.wait(left):
                return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.drain.close()
        self.guard.close()
        for t in self.snapshot_tiers:
            t.close()
        self.stager.close()
