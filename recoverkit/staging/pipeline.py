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

A failed save is logged once (logger ``recoverkit``, when it fails), listed in
:attr:`AsyncPipeline.failed` until the Checkpointer reports it, and its host snapshot is
not offered for restore unless some tier did commit the step: a step that never became
durable is never restored as if it had been.

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
        #: failed saves not yet reported to the user (under ``_released``), oldest first
        self.failed: list[SaveHandle] = []
        #: staged saves the drain has not started yet (under ``_released``): the ones a
        #: newer save may supersede before they are written, to free their memory
        self._waiting: list[tuple[SaveHandle, HostSnapshot]] = []

    # ---------------------------------------------------------------- the call
    def submit(self, step: int, plan: SavePlan, optimizers: list[Any], user_meta: Mapping[str, Any]) -> SaveHandle:
        t0 = time.perf_counter()
        tiers = [t for t in self.options.tiers.tiers_for(step) if t in self.tiers]
        handle = SaveHandle(step, tiers=tiers)
        snap: HostSnapshot | None = HostSnapshot(step, plan, self.pool, self.copier)
        assert snap is not None
        handle._snapshot = snap
        handle.metrics["prestep_wait_s"] = 0.0
        snap.metrics = handle.metrics
        if not self._allocate(snap, plan, handle):
            self.skipped += 1
            handle.skipped = True  # logged when it fails, in the drain (once)
            snap = handle._snapshot = None
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
        if snap is not None:
            with self._released:
                self._waiting.append((handle, snap))
        self._queue.put((handle, snap, plan, user_meta))
        return handle

    def _allocate(self, snap: HostSnapshot, plan: SavePlan, handle: SaveHandle) -> bool:
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
                if self.options.staging.when_full == "skip":
                    return False
                if self._evict_one() or self._drop_waiting(handle):
                    continue
                with self._released:
                    left = deadline - time.monotonic()
                    if left <= 0:
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

    def _drop_waiting(self, newer: SaveHandle) -> bool:
        """One-process jobs: free the oldest staged save the drain has not started and that
        ``newer`` supersedes (``newer`` goes to every tier it would have gone to)."""
        if not self.coalesce:
            return False
        with self._released:
            i = next((i for i, (h, _) in enumerate(self._waiting) if set(h.tiers) <= set(newer.tiers)), None)
            if i is None:
                return False
            handle, snap = self._waiting.pop(i)
            handle._dropped = True
        self.guard.discard(snap)
        snap.release()  # waits for its copies still in flight, then frees its ranges
        handle.superseded = dict.fromkeys(handle.tiers, newer.step)
        handle.metrics["superseded_by"] = newer.step
        handle.staged.set()
        newer._followers.append(handle)  # settled when the newer save is
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
            with self._released:
                if handle._dropped:
                    continue  # superseded and freed while it waited (_drop_waiting)
                self._waiting = [w for w in self._waiting if w[0] is not handle]
            newer = self._superseding(handle, backlog)
            last = max(newer.values(), key=lambda h: h.step, default=None)
            error: BaseException | None = None
            try:
                error = self._settle(handle, snap, plan, user_meta, {t: h.step for t, h in newer.items()})
            except BaseException as e:  # noqa: BLE001 - stays on the handle (logged once when settled)
                error = e
            finally:
                if snap is not None:
                    self.guard.discard(snap)
                    # a step no tier holds is not offered for restore from memory either
                    self._keep(snap, offer=error is None or bool(handle.committed_to))
                # settled only now: whoever waits sees the host tier as it will stay
                if error is None and last is not None and handle.superseded:
                    handle.metrics["superseded_by"] = last.step
                    last._followers.append(handle)  # its state is durable once the newer save is
                else:
                    self._settle_handle(handle, error)

    def _superseding(self, handle: SaveHandle, backlog: deque[Any]) -> dict[str, SaveHandle]:
        """Tier -> the newest queued save that will write it (one-process jobs only)."""
        newer: dict[str, SaveHandle] = {}
        if self.coalesce:
            for item in backlog:
                if item is not None and item[1] is not None and not item[0]._dropped:  # staged, not skipped
                    newer.update({t: item[0] for t in item[0].tiers if t in handle.tiers})
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
            failure = PoolExhaustedError(
                f"step {handle.step} skipped on rank {self.rank}: staging pool full ({self.skipped} saves skipped so far)"
            )
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
            handle.committed_to.append(name)
            handle.durable[name].set()
        return failure

    def _keep(self, snap: HostSnapshot, *, offer: bool = True) -> None:
        with self._released:
            if offer and not snap.released and self.options.tiers.host_keep > 0:
                self.host.append(snap)
            else:
                snap.release()
            while len(self.host) > self.options.tiers.host_keep:
                self.host.popleft().release()
            self._released.notify_all()

    def _settle_handle(self, handle: SaveHandle, error: BaseException | None) -> None:
        """Settle ``handle`` and the superseded saves that waited for it (they share its fate:
        their state is durable exactly when this newer save is).

        A failure is logged here, once per save, recorded for the Checkpointer's report, and
        its host snapshot withdrawn (unless a tier holds the step) *before* the handle is
        settled, so a restore after ``wait()`` never sees it.
        """
        if error is not None:
            self._withdraw(handle)
            newer = handle.metrics.get("superseded_by")
            why = f" (superseded by step {newer}, whose save failed)" if newer is not None else ""
            log.error("recoverkit: step %d was not saved: %s%s", handle.step, error, why)
            with self._released:
                self.failed.append(handle)
            handle._fail(error)
        else:
            handle.committed.set()
        for f in handle._followers:
            self._settle_handle(f, error)

    def _withdraw(self, handle: SaveHandle) -> None:
        """Stop offering the host snapshot of a failed save that no tier committed."""
        snap = handle._snapshot
        if snap is None or handle.committed_to:
            return
        with self._released:
            try:
                self.host.remove(snap)  # by identity: snapshots do not define ==
            except ValueError:
                return  # never kept, or already evicted
            self._released.notify_all()
        snap.release()

    def take_failed(self) -> list[SaveHandle]:
        """The failed saves not yet reported (whose ``wait`` did not raise); clears the list."""
        with self._released:
            out, self.failed = self.failed, []
        return [h for h in out if not h._reported]

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
