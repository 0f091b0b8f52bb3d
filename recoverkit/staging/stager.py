"""Staging: a save's tensors into the host pool, lazily, under back-pressure.

::

    save_async(step)  allocate pool ranges (the pool full: make room, wait, or skip)
                      -> hook the targets (pre-step waits) -> eager copies now, lazy
                      copies submitted to the engine -> the snapshot

A snapshot tier that lends arenas (the shm tier: :mod:`.slot_arena`) and is due for the
save is asked first: when it has a free slot, the save is staged into it (the pool is not
touched; no copy from the pool into shared memory follows); otherwise into the pool. Which
path each save took is counted here (``into_slot`` / ``into_pool``) and in its metrics
(``staged_in``). The tiers due are passed by the caller (``keep_in``); without them, the
tiers attached (:meth:`Stager.attach`) say themselves whether they expect the step.

When the pool is full, room is made first by the caller's ``make_room`` (the snapshot
tiers evict their oldest snapshot; a one-process job drops a staged save a newer one
supersedes); otherwise ``StagingPolicy.when_full`` says whether to wait for snapshots to be
released (at most ``wait_timeout_s``) or to skip the save. A skipped save is counted here.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("recoverkit")


class Stager:
    """Owns the staging pool and the copy engine; turns plans into snapshots."""

    def __init__(self, *, engine: Any, policy: StagingPolicy, guard: StepGuard) -> None:
        self.policy = policy
        self.pool = engine.StagingPool(policy.budget_bytes, lock_memory=policy.lock_memory)
        self.copier = engine.CopyEngine(policy.copy_threads)
        self.guard = guard
        self.skipped = 0  # saves skipped because the pool stayed full
        self.into_slot = 0  # saves staged straight into a shared-memory slot
        self.into_pool = 0  # saves staged into the pool
        self._lenders: list[Any] = []  # snapshot tiers that lend arenas (attach)
        self._freed = threading.Condition()

    def attach(self, lender: Any) -> None:
        """``lender`` (a snapshot tier with ``arena(step, plan, alignment, due=)``) may lend
        the saves it expects a slot to stage into (the shm tier attaches itself when it is
        first offered a snapshot of this stager)."""
        with self._freed:
            if all(x is not lender for x in self._lenders):
                self._lenders.append(lender)

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
        *,
        keep_in: Sequence[Any] | None = None,
    ) -> HostSnapshot | None:
        """Allocate and start copying ``plan``; None when the save is skipped (pool full).

        ``keep_in``: the snapshot tiers due for the step (None: ask the attached ones).

        Raises:
            PoolExhaustedError: the plan needs more than the whole pool.
        """
        snap = self._into_slot(step, plan, metrics, keep_in)
        if snap is None:
            snap = HostSnapshot(step, plan, self.pool, self.copier, metrics=metrics, on_release=self._notify)
            if not self._allocate(snap, plan, make_room):
                self.skipped += 1
                return None
            self.into_pool += 1
            metrics.staged_in("pool")
        snap.stager = self
        lazy: set[int] = set()
        for target in targets:
            lazy |= self.guard.watch(target)
        self.guard.add(snap)
        eager_s = snap.start_copies(lazy, self.policy.eager_bytes)
        metrics.called(
            call_s=time.perf_counter() - metrics.started, eager_copy_s=eager_s, nbytes=snap.nbytes
        )
        return snap

    def _into_slot(
        self, step: int, plan: SavePlan, metrics: SaveMetrics, keep_in: Sequence[Any] | None
    ) -> HostSnapshot | None:
        """The snapshot allocated in a slot a lender due for ``step`` lent, or None."""
        if keep_in is None:
            with self._freed:
                lenders, due = list(self._lenders), None
        else:
            lenders, due = [t for t in keep_in if callable(getattr(t, "arena", None))], True
        for lender in lenders:
            try:
                arena = lender.arena(step, plan, self.pool.alignment, due=due)
            except Exception as e:  # noqa: BLE001 - the pool path still works
                log.warning("recoverkit: step %d: no shared-memory slot to stage into (%s); staging into the pool", step, e)
                continue
            if arena is None:
                continue
            snap = HostSnapshot(step, plan, arena, self.copier, metrics=metrics, on_release=self._notify)
            try:
                snap.allocate(plan)
            except PoolExhaustedError as e:  # the lender sized it too small: a bug, not fatal
                log.error("recoverkit: step %d: the slot lent to stage into is too small: %s", step, e)
                arena.release()
                continue
            self.into_slot += 1
            metrics.staged_in("shm")
            return snap
        return None

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
