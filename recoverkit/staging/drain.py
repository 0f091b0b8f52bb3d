"""Drain ordering: staged saves to their tiers, one at a time, in submission order.

::

    drain thread:  wait staged -> the early snapshot tiers due copy it (shared memory,
                   peer replicas) -> committer: for each tier due, two-phase commit from
                   the staged bytes -> durable(tier) -> retention -> settled
                   -> offer the snapshot to the other snapshot tiers due (the host cache)

An early tier (:attr:`SnapshotTier.early`) is offered the snapshot as soon as every byte
is staged, so a crash during the disk commit still finds the step in shared memory; its
failure is logged (the 1st, 10th, 100th, ... of a tier as a warning) and counted
(:attr:`Drain.early_failures`), never fails the save.

Every rank commits the same steps in the same order. A rank that had to skip a save (pool
full) still takes part in its commit and reports the skip, so the step fails on every rank
alike.

A failed save is logged once (logger ``recoverkit``, when it fails), listed in
:attr:`Drain.failed` until the Checkpointer reports it, and withdrawn from the snapshot
tiers unless some tier did commit the step: a step that never became durable is never
restored as if it had been.

In a one-process job (``coalesce``) a save still waiting for a tier when a newer save for
the same tier is already staged is *superseded* on that tier: the drain writes the newer
one instead, so a disk slower than the save interval never makes the durable step fall
further and further behind (``handle.superseded`` names the step that replaced it). A tier
only the older save was scheduled for (say, the persistent tier every 100 steps) is still
written. When the pool is full, the oldest staged save a newer one supersedes is dropped
before the drain reaches it (:meth:`Drain.drop_waiting`). Multi-rank jobs keep every save,
since ranks would not agree on timing.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CommitError
from ..storage.base import RankPayload, Tier
from .base import SnapshotTier
from .committer import CommitReport, Committer
from .guard import StepGuard
from .handle import SaveHandle
from .plan import SavePlan
from .snapshot import HostSnapshot

__all__ = ["Drain", "DrainJob"]

log = logging.getLogger("recoverkit")


@dataclass(eq=False)
class DrainJob:
    """One staged (or skipped) save on its way to its tiers."""

    handle: SaveHandle
    snap: HostSnapshot | None  # None: skipped (``skip_error`` says why)
    plan: SavePlan
    user_meta: Mapping[str, Any]
    tiers: Sequence[Tier]  # the commit tiers due, fastest first (``handle.tiers``)
    keep_in: Sequence[SnapshotTier]  # the snapshot tiers due
    skip_error: BaseException | None = None


class Drain:
    """The drain thread and its ordering (see the module docstring)."""

    def __init__(
        self,
        *,
        committer: Committer,
        guard: StepGuard,
        snapshot_tiers: Sequence[SnapshotTier],
        rank: int,
        coalesce: bool = False,
    ) -> None:
        self.committer = committer
        self.guard = guard
        self.snapshot_tiers = list(snapshot_tiers)
        self.rank = rank
        self.coalesce = coalesce
        self._lock = threading.Lock()
        self._queue: queue.Queue[DrainJob | None] = queue.Queue()
        #: failed saves not yet reported to the user (under ``_lock``), oldest first
        self.failed: list[SaveHandle] = []
        #: staged saves the drain has not started yet (under ``_lock``): the ones a newer
        #: save may supersede before they are written, to free their memory
        self._waiting: list[DrainJob] = []
        #: tier name -> offers of an early snapshot tier that failed (each logged)
        self.early_failures: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="recoverkit-drain", daemon=True)
        self._thread.start()

    def put(self, job: DrainJob) -> None:
        if job.snap is not None:
            with self._lock:
                self._waiting.append(job)
        self._queue.put(job)

    def drop_waiting(self, newer: SaveHandle) -> bool:
        """One-process jobs: free the oldest staged save the drain has not started and that
        ``newer`` supersedes (``newer`` goes to every tier it would have gone to)."""
        if not self.coalesce:
            return False
        with self._lock:
            i = next(
                (i for i, j in enumerate(self._waiting) if set(j.handle.tiers) <= set(newer.tiers)),
                None,
            )
            if i is None:
                return False
            job = self._waiting.pop(i)
            job.handle._dropped = True
        snap = job.snap
        assert snap is not None
        self.guard.discard(snap)
        snap.release()  # waits for its copies still in flight, then frees its ranges
        handle = job.handle
        handle.superseded = dict.fromkeys(handle.tiers, newer.step)
        handle.metrics.superseded_by(newer.step)
        handle.staged.set()
        newer._followers.append(handle)  # settled when the newer save is
        return True

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        backlog: deque[DrainJob | None] = deque()
        while True:
            if not backlog:
                backlog.append(self._queue.get())
            while True:  # everything already queued: newer saves may supersede older ones
                try:
                    backlog.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            job = backlog.popleft()
            if job is None:
                return
            handle, snap = job.handle, job.snap
            with self._lock:
                if handle._dropped:
                    continue  # superseded and freed while it waited (drop_waiting)
                self._waiting = [w for w in self._waiting if w is not job]
            newer = self._superseding(handle, backlog)
            last = max(newer.values(), key=lambda h: h.step, default=None)
            error: BaseException | None = None
            try:
                error = self._settle(job, {t: h.step for t, h in newer.items()})
            except BaseException as e:  # noqa: BLE001 - stays on the handle (logged once when settled)
                error = e
            finally:
                if snap is not None:
                    self.guard.discard(snap)
                    # a step no tier holds is not offered for restore from memory either
                    self._keep(job, offer=error is None or bool(handle.committed_to))
                # settled only now: whoever waits sees the snapshot tiers as they will stay
                if error is None and last is not None and handle.superseded:
                    handle.metrics.superseded_by(last.step)
                    last._followers.append(handle)  # its state is durable once the newer save is
                else:
                    self._settle_handle(handle, error)

    def _superseding(
        self, handle: SaveHandle, backlog: deque[DrainJob | None]
    ) -> dict[str, SaveHandle]:
        """Tier -> the newest queued save that will write it (one-process jobs only)."""
        newer: dict[str, SaveHandle] = {}
        if self.coalesce:
            for job in backlog:
                if (
                    job is not None and job.snap is not None and not job.handle._dropped
                ):  # staged, not skipped
                    newer.update({t: job.handle for t in job.handle.tiers if t in handle.tiers})
        return newer

    def _settle(self, job: DrainJob, newer: Mapping[str, int]) -> BaseException | None:
        """Commit the staged save to each tier due; returns the error that ends it, if any."""
        handle, snap = job.handle, job.snap
        failure: BaseException | None = job.skip_error
        payload = None
        if snap is not None:
            try:
                snap.wait_all()
                payload = snap.payload(self.rank)
            except BaseException as e:  # noqa: BLE001 - reported through the commit
                failure = e
            handle.metrics.staged()
        handle.staged.set()
        if snap is not None and failure is None:
            self._offer_early(job)
        if failure is None:
            handle.superseded.update({t.name: newer[t.name] for t in job.tiers if t.name in newer})
            tiers = [t for t in job.tiers if t.name not in newer]
        else:  # every rank still takes part, reporting the failure, so the step fails alike
            tiers, payload = list(job.tiers), RankPayload(self.rank, b"", [], error=failure)
        assert payload is not None
        report = CommitReport(committed_to=handle.committed_to)  # filled in tier by tier

        def durable(name: str) -> None:
            handle.durable[name].set()

        try:
            self.committer.commit(
                tiers,
                handle.step,
                payload,
                job.plan.aliases,
                job.user_meta,
                metrics=handle.metrics,
                on_durable=durable,
                report=report,
            )
        except CommitError as e:
            return e
        return failure

    def _offer_early(self, job: DrainJob) -> None:
        """The early snapshot tiers due copy the staged snapshot, in list order; a failure
        is logged and counted, and the save goes on."""
        snap = job.snap
        assert snap is not None
        for tier in job.keep_in:
            if not tier.early:
                continue
            try:
                owned = tier.offer(snap)
            except Exception as e:  # noqa: BLE001 - never fails the save
                with self._lock:
                    n = self.early_failures[tier.name] = self.early_failures.get(tier.name, 0) + 1
                # a tier failing every step (shared memory full) warns at the 1st, 10th, 100th, ...
                level = logging.WARNING if math.log10(n).is_integer() else logging.DEBUG
                log.log(level, "recoverkit: step %d was not kept in the %s tier (%d failure(s) so far): %s",
                        job.handle.step, tier.name, n, e)
                continue
            if owned:  # pragma: no cover - a contract violation: the drain still releases it
                log.error("recoverkit: the early tier %s claimed a staged snapshot it must only copy", tier.name)

    def _keep(self, job: DrainJob, *, offer: bool) -> None:
        """Hand the snapshot to the first (not early) snapshot tier due that takes it; else
        release it."""
        snap = job.snap
        assert snap is not None
        owned = False
        if offer and not snap.released:
            for tier in job.keep_in:
                if not tier.early and tier.offer(snap):
                    owned = True
                    break
        if not owned:
            snap.release()

    def _settle_handle(self, handle: SaveHandle, error: BaseException | None) -> None:
        """Settle ``handle`` and the superseded saves that waited for it (they share its fate:
        their state is durable exactly when this newer save is).

        A failure is logged here, once per save, recorded for the Checkpointer's report, and
        its snapshot withdrawn (unless a tier holds the step) *before* the handle is settled,
        so a restore after ``wait()`` never sees it.
        """
        if error is not None:
            snap = handle._snapshot
            if snap is not None and not handle.committed_to:
                for tier in self.snapshot_tiers:
                    tier.withdraw(snap)
            newer = handle.metrics.get("superseded_by")
            why = f" (superseded by step {newer}, whose save failed)" if newer is not None else ""
            log.error("recoverkit: step %d was not saved: %s%s", handle.step, error, why)
            with self._lock:
                self.failed.append(handle)
            handle._fail(error)
        else:
            handle.committed.set()
        for f in handle._followers:
            self._settle_handle(f, error)

    def take_failed(self) -> list[SaveHandle]:
        """The failed saves not yet reported (whose ``wait`` did not raise); clears the list."""
        with self._lock:
            out, self.failed = self.failed, []
        return [h for h in out if not h._reported]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
