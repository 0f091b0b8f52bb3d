"""Staging: a save's tensors into the host pool, lazily, under back-pressure.

::

    save_async(step)  allocate pool ranges (the pool full: make room, wait, or skip)
                      -> hook the targets (pre-step waits) -> eager copies now, lazy
                      copies submitted to the engine -> the snapshot

When the pool is full, room is made first by the caller's ``make_room`` (the snapshot
tiers evict their oldest snapshot; a one-process job drops a staged save a newer one
supersedes); otherwise ``StagingPolicy.when_full`` says whether to wait for snapshots to be
released (at most ``wait_timeout_s``) or to skip the save. A skipped save is counted here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..config import StagingPolicy
from ..errors import PoolExhaustedError
from .guard import StepGuard
from .metrics import SaveMetrics
from .plan import SavePlan
from .snapshot import HostSnapshot

__all__ = ["Stager"]


class Stager:
    """Owns the staging pool and the copy engine; turns plans into snapshots."""

    def __init__(self, *, engine: Any, policy: StagingPolicy, guard: StepGuard) -> None:
        self.policy = policy
        self.pool = engine.StagingPool(policy.budget_bytes, lock_memory=policy.lock_memory)
        self.copier = engine.CopyEngine(policy.copy_threads)
        self.guard = guard
        self.skipped = 0  # saves skipped because the pool stayed full
        self._freed = threading.Condition()

    def _notify(self) -> None:
        with self._freed:
            self._freed.notify_all()

    def stage(
        self,
        step: int,
        plan: SavePlan,
        targets: Sequence[Any],
        metrics: SaveMetrics,
        make_room: Callable[[], bool],
    ) -> HostSnapshot | None:
        """Allocate and start copying ``plan``; None when the save is skipped (pool full).

        Raises:
            PoolExhaustedError: the plan needs more than the whole pool.
        """
        snap = HostSnapshot(
            step, plan, self.pool, self.copier, metrics=metrics, on_release=self._notify
        )
        if not self._allocate(snap, plan, make_room):
            self.skipped += 1
            return None
        lazy: set[int] = set()
        for target in targets:
            lazy |= self.guard.watch(target)
        self.guard.add(snap)
        eager_s = snap.start_copies(lazy, self.policy.eager_bytes)
        metrics.called(
            call_s=time.perf_counter() - metrics.started, eager_copy_s=eager_s, nbytes=snap.nbytes
        )
        return snap

    def _allocate(self, snap: HostSnapshot, plan: SavePlan, make_room: Callable[[], bool]) -> bool:
        need = HostSnapshot.footprint(plan, self.pool.alignment)
        if need > self.pool.capacity:
            raise PoolExhaustedError(
                f"step {snap.step} needs {need} bytes of staging, the pool has {self.pool.capacity}; "
                "raise StagingPolicy.budget_bytes"
            )
        deadline = time.monotonic() + self.policy.wait_timeout_s
        while True:
            try:
                snap.allocate(plan)
                return True
            except PoolExhaustedError:
                if self.policy.when_full == "skip":
                    return False
                if make_room():
                    continue
                with self._freed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._freed.wait(min(left, 0.5))

    def close(self) -> None:
        self.copier.close()
        self.pool.close()
