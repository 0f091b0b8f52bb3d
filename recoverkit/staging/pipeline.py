"""The lazy asynchronous save pipeline: stage in the call, drain in the background.

::

    save_async(step)  plan -> allocate pool ranges (back-pressure) -> eager copies now,
                      lazy copies submitted to the engine -> handle   (returns at once)
    next optimizer step: pre-step hook waits only for that optimizer's lazy copies
    drain thread:     wait staged -> for each tier the policy names: two-phase commit from
                      the staged bytes -> durable(tier) -> committed -> retention
                      -> keep the newest ``host_keep`` snapshots in memory (tier 1)

The drain thread handles saves one at a time in submission order, so every rank commits
the same steps in the same order. A rank that must skip a save (pool full) still takes
part in its commit and reports the skip, so the step fails on every rank alike.

In a one-process job (``coalesce``) a save still waiting for a tier when a newer save for
the same tier is already staged is *superseded* on that tier: the drain writes the newer
one instead, so a disk slower than the save interval never makes the durable step fall
further and further behind (``handle.superseded`` names the step that replaced it). A
tier only the older save was scheduled for (say, the persistent tier every 100 steps) is
still written. Multi-rank jobs keep every save, since ranks would not agree on timing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ..config import CheckpointOptions
from ..errors import CommitError, PoolExhaustedError
from ..storage.base import RankPayload, Tier
from .guard import StepGuard, mutated_storages
from .handle import SaveHandle
from .plan import SavePlan
from .snapshot import HostSnapshot

__all__ = ["AsyncPipeline"]

log = logging.getLogger("recoverkit")

#: commit(tier, step, payload, aliases, user_meta) -> None; raises CommitError
CommitFn = Callable[[Tier, int, RankPayload, Mapping[str, Any], Mapping[str, Any]], None]


class AsyncPipeline:
    """Owns the staging pool, the copy engine, the guard and the drain thread."""

    def __init__(
        self, *, options: CheckpointOptions, engine: Any, tiers: Mapping[str, Tier], rank: int, commit: CommitFn,
        coalesce: bool = False,
    ) -> None:
        sp = options.staging
        self.options = options
        self.engine = engine
        self.pool = engine.StagingPool(sp.budget_bytes, lock_memory=sp.lock_memory)
        self.copier = engine.CopyEngine(sp.copy_threads)
        self.tiers = dict(tiers)
        self.rank = rank
        self.commit = commit
        self.coalesce = coalesce
        self.guard = StepGuard()
        self.skipped = 0
        self.host: deque[HostSnapshot] = deque()  # tier 1: newest snapshots kept in memory
        self._released = threading.Condition()
        self._queue: queue.Queue[tuple[SaveHandle, HostSnapshot | None, SavePlan, Mapping[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="recoverkit-drain", daemon=True)
        self._thread.start()
        self._closed = False
        self._inflight: list[SaveHandle] = []

    # ---------------------------------------------------------------- the call
    def submit(self, step: int, plan: SavePlan, optimizers: list[Any], user_meta: Mapping[str, Any]) -> SaveHandle:
        t0 = time.perf_counter()
        tiers = [t for t in self.options.tiers.tiers_for(step) if t in self.tiers]
        handle = SaveHandle(step, tiers=tiers)
        snap: HostSnapshot | None = HostSnapshot(step, plan, self.pool, self.copier)
        assert snap is not None
        handle.metrics["prestep_wait_s"] = 0.0
        snap.metrics = handle.metrics
        if not self._allocate(snap, plan):
            self.skipped += 1
            handle.skipped = True
            log.warning("recoverkit: step %d not saved: staging pool full (%d saves skipped so far)", step, self.skipped)
            snap = None
        if snap is not None:
            lazy: set[int] = set()
            for opt in optimizers:
                self.guard.watch(opt)
                lazy |= mutated_storages(opt)
            self.guard.add(snap)
            handle.metrics["eager_copy_s"] = snap.start_copies(lazy, self.options.staging.eager_bytes)
            handle.metrics["bytes"] = snap.nbytes
        handle.metrics["call_s"] = time.perf_counter() - t0
        handle.metrics["submitted_at"] = t0
        self._inflight = [h for h in self._inflight if not h.done()] + [handle]
        self._queue.put((handle, snap, plan, user_meta))
        return handle

    def _allocate(self, snap: HostSnapshot, plan: SavePlan) -> bool:
        need = HostSnapshot.footprint(plan, self.pool.alignment)
        if need > self.pool.capacity:
            raise PoolExhaustedError(
                f"step {snap.step} needs {need} bytes of staging, the pool has {self.pool.capacity}; "
                "raise StagingPolicy.budget_bytes"
            )
        deadline = time.monotonic() + self.options.staging.wait_timeout_s
        while True:
            try:
                snap.allocate(plan)
                return True
            except PoolExhaustedError:
                if self.options.staging.when_full == "skip" or not self._evict_one():
                    with self._released:
                        left = deadline - time.monotonic()
                        if self.options.staging.when_full == "skip" or left <= 0:
                            return False
                        self._released.wait(min(left, 0.5))

    def _evict_one(self) -> bool:
        """Free the oldest kept host snapshot, if any (kept snapshots yield to new saves)."""
        with self._released:
            if not self.host:
                return False
            old = self.host.popleft()
        old.release()
        return True

    # ---------------------------------------------------------------- the drain
    def _drain(self) -> None:
        backlog: deque[Any] = deque()
        while True:
            if not backlog:
                backlog.append(self._queue.get())
            while True:  # everything already queued: newer saves may supersede older ones
                try:
                    backlog.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            item = backlog.popleft()
            if item is None:
                return
            handle, snap, plan, user_meta = item
            newer = self._superseding(handle, backlog)
            error: BaseException | None = None
            try:
                error = self._settle(handle, snap, plan, user_meta, newer)
            except BaseException as e:  # noqa: BLE001 - stays on the handle; training goes on
                log.error("recoverkit: step %d: %s", handle.step, e)
                error = e
            finally:
                if snap is not None:
                    self.guard.discard(snap)
                    self._keep(snap)
                # settled only now: whoever waits sees the host tier as it will stay
                if error is not None:
                    handle._fail(error)
                else:
                    handle.committed.set()

    def _superseding(self, handle: SaveHandle, backlog: deque[Any]) -> dict[str, int]:
        """Tier -> the newest queued step that will write it (one-process jobs only)."""
        newer: dict[str, int] = {}
        if self.coalesce:
            for item in backlog:
                if item is not None and item[1] is not None:  # a staged, not skipped, save
                    newer.update({t: item[0].step for t in item[0].tiers if t in handle.tiers})
        return newer

    def _settle(
        self, handle: SaveHandle, snap: HostSnapshot | None, plan: SavePlan, user_meta: Mapping[str, Any],
        newer: Mapping[str, int],
    ) -> BaseException | None:
        """Commit the staged save to each tier due; returns the error that ends it, if any."""
        t0 = handle.metrics["submitted_at"]
        failure: BaseException | None = None
        payload = None
        if snap is not None:
            try:
                snap.wait_all()
                payload = snap.payload(self.rank)
            except BaseException as e:  # noqa: BLE001 - reported through the commit
                failure = e
            handle.metrics["staging_s"] = time.perf_counter() - t0
        else:
            failure = PoolExhaustedError(f"step {handle.step} skipped on rank {self.rank}: staging pool full")
        handle.staged.set()
        for name in handle.tiers:
            if name in newer and failure is None:
                handle.superseded[name] = newer[name]
                continue
            try:
                self.commit(self.tiers[name], handle.step, payload if failure is None else RankPayload(self.rank, b"", [], error=failure), plan.aliases, user_meta)
            except CommitError as e:
                return e
            handle.metrics[f"durable_s/{name}"] = time.perf_counter() - t0
            handle.durable[name].set()
        return failure

    def _keep(self, snap: HostSnapshot) -> None:
        with self._released:
            if not snap.released and self.options.tiers.host_keep > 0:
                self.host.append(snap)
            else:
                snap.release()
            while len(self.host) > self.options.tiers.host_keep:
                self.host.popleft().release()
            self._released.notify_all()

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
        self._queue.put(None)
        self._thread.join()
        self.guard.close()
        while self.host:
            self.host.popleft().release()
        self.copier.close()
        self.pool.close()

