"""The Checkpointer: a thin sequencer of the save and restore stages.

tiers:       ``options.tiers`` is a list (fastest first); each entry is built by the tier
             registry (``staging.registry``) and scheduled by ``staging.schedule``; this
             module never names a tier: a ``Tier`` is committed, a ``SnapshotTier`` is fed
             the staged snapshots of ``save_async``
save:        plan (capture, flatten, classify, encode) -> contiguous bytes -> the Committer:
             for each commit tier due, two-phase commit -> retention
save_async:  plan -> the pipeline: stage into the host pool (lazy copies guarded by the
             step hooks) -> drain: the same Committer -> the snapshot tiers due keep it
restore:     snapshot tiers agree across ranks on what they hold -> newest step on the
             fastest tier that holds it -> read + verify every byte -> check the targets
             fit -> apply
discovery:   steps / latest / manifest ask the same CheckpointReader restore uses, over
             the same tiers, so they never disagree on which steps exist

The Committer also remembers, per tier, what was learned of the steps' data (known good:
committed or restored; known bad: found damaged by a restore), for retention.

Each stage lives in its own module; this one orders them, times them and turns failures
into the error the user sees.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._native import engine as default_engine
from .config import CheckpointOptions, TierSpec
from .distributed.coordinator import Coordinator, default_coordinator
from .errors import CommitError
from .format.manifest import Manifest
from .reading import CheckpointReader, RestoreResult
from .staging.base import SnapshotTier, StepHooks
from .staging.committer import Committer
from .staging.handle import SaveHandle
from .staging.metrics import SaveMetrics
from .staging.pipeline import AsyncPipeline
from .staging.plan import SavePlan, plan_save
from .staging.registry import TierContext, build_tier, check_writable
from .staging.schedule import Schedule
from .staging.sync import stage_now
from .storage.base import RankPayload, ReadableTier, Tier
from .storage.faults import FaultInjector
from .storage.fs import LocalFS
from .storage.lock import RunLock

__all__ = ["Checkpointer", "SaveResult"]

log = logging.getLogger("recoverkit")

#: :meth:`Checkpointer.abandon`: seconds the tiers' close gets once the pending saves settled
ABANDON_PEERS_S = 0.25


@dataclass(frozen=True)
class SaveResult:
    """What one blocking save did and how long each stage took (seconds).

    Attributes:
        step: the step saved.
        path: where the step lies on the fastest tier it was committed to ("" when the
            tier policy names no tier for this step, so nothing was written).
        nbytes: bytes of state (tensor bytes and the encoded non-tensor blob).
        timings_s: ``capture``, ``stage``, ``commit`` and ``retention`` (over every tier),
            ``commit/<tier>`` per tier, and ``total``.
        deleted_steps: steps retention deleted after the commit, on any tier, ascending.
        committed_to: the tiers the step was committed to, in list order: exactly the
            commit tiers of ``options.tiers`` due for the step (as for ``save_async``).
        paths: tier name -> where the step lies on that tier.
    """

    step: int
    path: str
    nbytes: int
    timings_s: Mapping[str, float] = field(default_factory=dict)
    deleted_steps: tuple[int, ...] = ()
    committed_to: tuple[str, ...] = ()
    paths: Mapping[str, str] = field(default_factory=dict)


class Checkpointer:
    """Saves and restores a whole training state under one root directory.

    Args:
        root: the checkpoint root (created if missing; must be writable).
        options: :class:`~recoverkit.CheckpointOptions`.
        fs: file-system operations (inject a ``FaultyFS`` to test failures).
        faults: a :class:`~recoverkit.storage.faults.FaultInjector` told of every phase.
        run_id: identifies the run in every manifest (agreed across ranks if not given).
        coordinator: how ranks agree on commits (default: the torch.distributed store).
        persistent: a tier that takes the place of the list's ``persistent`` entry (without
            one, it is read but never written).
        engine: the copy/IO engine of the lazy path (default: native, or the fallback).
        step_hooks: where the pre-step wait of ``save_async`` is installed (default: the
            torch optimizers of the state; DeepSpeed/Megatron adapters bring their own).

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(2, 2)
        >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     _ = ckpt.save(1, {"model": model})
        ...     ckpt.restore({"model": model})
        1
    """

    _instances = 0  # Checkpointers built in this process (the same order on every rank)

    def __init__(
        self,
        root: str,
        *,
        options: CheckpointOptions | None = None,
        fs: LocalFS | None = None,
        faults: FaultInjector | None = None,
        run_id: str | None = None,
        coordinator: Coordinator | None = None,
        persistent: Tier | None = None,
        engine: Any = None,
        step_hooks: StepHooks | None = None,
    ) -> None:
        self.engine = engine or default_engine
        self.options = options or CheckpointOptions()
        self.faults = faults or FaultInjector()
        self.fs = fs if fs is not None else LocalFS(engine=self.engine)
        self.root = os.path.abspath(os.fspath(root))
        self.step_hooks = step_hooks
        # a fresh namespace of the job's store per Checkpointer: keys of an earlier attempt
        # (torchrun keeps its store across restarts) are never read as this one's
        self.coordinator = coordinator or default_coordinator(timeout_s=self.options.commit_timeout_s)
        self.rank = self.coordinator.rank
        self.world_size = self.coordinator.world_size
        self.run_id = run_id or self._agree_run_id()
        # an unwritable root (read-only, full, no permission) fails here, before step 1
        check_writable(self.fs, self.root, "checkpoint root")
        ctx = TierContext(
            root=self.root, fs=self.fs, engine=self.engine, faults=self.faults, options=self.options,
            run_id=self.run_id, rank=self.rank, world_size=self.world_size, coordinator=self.coordinator,
        )
        specs = self.options.tier_specs
        built: list[ReadableTier] = []
        for spec in specs:
            if persistent is not None and spec.kind == persistent.name:  # an injected store takes its place
                persistent.name = spec.name
                built.append(persistent)
                persistent = None
            else:
                built.append(build_tier(spec, ctx))
        if persistent is not None:  # injected without an entry of its kind: read, never written
            built.append(persistent)
            specs = (*specs, TierSpec(kind=persistent.name, every_steps=0))
        #: every tier, fastest first, by name (the order of ``options.tiers``)
        self.tiers: dict[str, ReadableTier] = {t.name: t for t in built}
        self._schedule = Schedule(
            specs, coordinator=self.coordinator, scope=f"{self.run_id}/schedule", timeout_s=self.options.commit_timeout_s
        )
        self.committer = Committer(coordinator=self.coordinator, run_id=self.run_id, options=self.options, faults=self.faults)
        self._pipeline: AsyncPipeline | None = None
        self._closed = False
        self._locks: list[RunLock] = []
        if self.rank == 0 and self.options.lock:  # the roots' writer: fences other jobs
            roots = [self.root] + [r for r in dict.fromkeys(_root_of(t) for t in built) if r and r != self.root]
            try:
                for r in roots:
                    self.fs.makedirs(r)
                    self._locks.append(RunLock(r).acquire())
            except BaseException:
                self._release_locks()
                raise
            # Only the lock holder clears interrupted saves: without the lock, the ``.tmp-*``
            # directories here may be a live trainer's saves in flight.
            for t in built:
                cleanup = getattr(t, "cleanup", None)
                if callable(cleanup) and _root_of(t):
                    cleanup()

    @property
    def tier(self) -> Any:
        """The tier whose storage is the root (the node-local disk), or None if none is."""
        return next((t for t in self.tiers.values() if _root_of(t) == self.root), None)

    def _agree_run_id(self) -> str:
        """Rank 0's new run id, on every rank (its store keys are dropped once all have read it)."""
        proposal = {"run_id": uuid.uuid4().hex} if self.rank == 0 else None
        scope = f"run-id/{Checkpointer._instances}"  # distinct if one coordinator serves several
        Checkpointer._instances += 1
        try:
            answer = self.coordinator.broadcast(f"{scope}/value", proposal, timeout_s=self.options.commit_timeout_s)
        finally:
            self.coordinator.finish(scope, broadcasts=("value",))
        return str(answer["run_id"])

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Mapping[str, Any], *, user_meta: Mapping[str, Any] | None = None) -> SaveResult:
        """Save ``state`` as ``step``; return once it is committed to every tier due.

        The tiers are the entries of ``options.tiers`` due for ``step``
        (:meth:`TierSpec.due <recoverkit.config.TierSpec.due>`), in list order, exactly as
        for :meth:`save_async` (snapshot tiers such as host memory aside: they hold staged
        snapshots only). Each tier is committed, then its retention runs;
        :attr:`SaveResult.committed_to` names them (empty, and nothing written, when none is
        due for this step).

        ``state`` maps names to Stateful objects (modules, optimizers, schedulers, samplers,
        anything with ``state_dict``/``load_state_dict``), tensors, ShardedTensors and plain
        values. In a multi-rank job every rank calls ``save`` with the same step.

        Raises:
            CommitError: a tier's commit failed (naming the tier); tiers committed before it
                keep the step, tiers after it are not written.

        Example:
            >>> import tempfile, torch
            >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
            ...     ckpt.save(1, {"w": torch.ones(2)}).committed_to
            ('local',)
        """
        _check_step(step)
        self.settle()  # earlier async saves settle first (their failures are reported by wait/close)
        metrics = SaveMetrics()
        t = _Timer()
        plan = self._plan(state)
        t.lap("capture")
        shards = [stage_now(p) for p in plan.shards]
        t.lap("stage")
        payload = RankPayload(self.rank, plan.blob, shards)
        due = self._commit_tiers(self._schedule.due(step))
        report = self.committer.commit(due, step, payload, plan.aliases, user_meta or {}, metrics=metrics)
        t.lap("commit")  # commits and retentions together, split below
        per_tier = {k: float(v) for k, v in metrics.items() if k.startswith(("commit/", "retention/"))}
        t.laps["retention"] = sum(v for k, v in per_tier.items() if k.startswith("retention/"))
        t.laps["commit"] -= t.laps["retention"]
        t.laps.update(per_tier)
        nbytes = len(plan.blob) + sum(int(s.data.numel()) for s in shards)
        names = tuple(x.name for x in due)
        paths = {x.name: _where(x, step) for x in due}
        return SaveResult(step, paths[names[0]] if names else "", nbytes, t.laps, tuple(sorted(report.deleted)), names, paths)

    def save_async(self, step: int, state: Mapping[str, Any], *, user_meta: Mapping[str, Any] | None = None) -> SaveHandle:
        """Start saving ``state`` as ``step`` and return at once.

        Parameters and optimizer state are copied to host memory while training goes on;
        each optimizer's next ``step()`` waits only for its own tensors' copies. Then the
        step drains to the tiers ``options.tiers`` names. Call :meth:`before_update` before
        changing saved tensors outside an optimizer.
        """
        _check_step(step)
        plan = self._plan(state)
        pipeline = self._pipeline_()
        targets = pipeline.guard.hooks.targets(state)
        names = self._schedule.due(step)
        keep_in = [t for t in self._snapshot_tiers() if t.name in names]
        return pipeline.submit(step, plan, targets, user_meta or {}, tiers=self._commit_tiers(names), keep_in=keep_in)

    def before_update(self) -> None:
        """Wait for every pending copy; call before mutating saved tensors by hand."""
        if self._pipeline is not None:
            self._pipeline.guard.before_update()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every ``save_async`` so far is settled; raise if any of them failed.

        Returns True when every save is settled, False if ``timeout_s`` passed first (the
        failures known by then are still raised).

        Raises:
            CommitError: naming every step whose save failed since the last report (a
                report is this call, :meth:`close` or :meth:`take_failed_saves`; a failure
                that its own handle's ``wait`` already raised is not repeated). Each failure
                was also logged once, as an error, when it happened.

        Example:
            >>> import tempfile, torch
            >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
            ...     _ = ckpt.save_async(1, {"w": torch.ones(2)})
            ...     ckpt.wait()
            True
        """
        settled = self.settle(timeout_s)
        failed = self.take_failed_saves()
        if failed:
            raise _failed_saves_error(failed)
        return settled

    def take_failed_saves(self) -> list[tuple[int, BaseException]]:
        """``(step, error)`` of every save that failed since the last report, by step.

        Does not wait; what it returns counts as reported (``wait``/``close`` will not raise
        it again). For loops that keep training when a save fails, as ``protect`` does.
        """
        if self._pipeline is None:
            return []
        return sorted(((h.step, h.error) for h in self._pipeline.take_failed() if h.error is not None), key=lambda f: f[0])

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait like :meth:`wait`, but leave failed saves for :meth:`take_failed_saves`.

        Returns False if ``timeout_s`` passed first.
        """
        return self._pipeline is None or self._pipeline.flush(timeout_s)

    @property
    def skipped_saves(self) -> int:
        """Saves skipped because the staging pool was full."""
        return 0 if self._pipeline is None else self._pipeline.skipped

    def _plan(self, state: Mapping[str, Any]) -> SavePlan:
        return plan_save(
            state,
            rank=self.rank,
            world_size=self.world_size,
            capture_rng=self.options.capture_rng,
            allow_pickle=self.options.allow_pickle,
            piece_bytes=self.options.piece_bytes,
        )

    def _commit_tiers(self, names: Sequence[str]) -> list[Tier]:
        """The tiers committed through the protocol among ``names``, in list order."""
        return [t for t in self.tiers.values() if t.name in names and isinstance(t, Tier)]

    def _snapshot_tiers(self) -> list[SnapshotTier]:
        return [t for t in self.tiers.values() if isinstance(t, SnapshotTier)]

    def _pipeline_(self) -> AsyncPipeline:
        if self._pipeline is None:
            self._pipeline = AsyncPipeline(
                engine=self.engine, staging=self.options.staging, committer=self.committer,
                snapshot_tiers=self._snapshot_tiers(), rank=self.rank, hooks=self.step_hooks,
                coalesce=self.world_size == 1,
            )
        return self._pipeline

    # --------------------------------------------------------------- restore
    def restore(self, state: MutableMapping[str, Any], step: int | None = None, *, strict: bool = True) -> RestoreResult:
        """Restore ``state`` in place from ``step`` (default: the newest valid step).

        Looks in the tiers of ``options.tiers`` in list order (by default the host
        snapshots, then the local tier, then the persistent tier), and takes the newest
        step from the fastest tier that holds it. In a job of several ranks, every rank
        calls it: the ranks first agree on the host snapshots every rank holds (only those
        are offered; see :meth:`HostTier.agree <recoverkit.staging.host_tier.HostTier.agree>`).
        Every byte is verified
        before anything is applied; a damaged step is skipped with a
        :class:`CheckpointSkippedWarning` and the next candidate is used. ShardedTensor
        targets receive their region of the saved global tensor, whatever sharding saved
        it. Returns the step restored (an ``int``, a :class:`~recoverkit.reading.RestoreResult`);
        raises CheckpointNotFoundError if none is valid. ``strict=False`` loads only the
        entries ``state`` names and reports the rest (see :meth:`CheckpointReader.restore
        <recoverkit.reading.CheckpointReader.restore>`, which does the work).

        A step whose async save failed on every tier it was sent to is never offered (not
        even from host memory). The step used is remembered as known good, the damaged
        ones skipped as known bad, for retention (see :mod:`recoverkit.storage.discovery`).
        """
        self.settle()
        # every rank: which snapshots every rank holds. Lazy saves are collective, so a
        # Checkpointer that staged none holds none in its process on any rank: no exchange
        # (a restore at start-up, or on one rank only, never waits for the others). Tiers
        # whose snapshots outlive the process (shared memory, ``early``) may hold an
        # earlier process's: they agree at start-up too (every rank restores then).
        for t in self._snapshot_tiers():
            agree = getattr(t, "agree", None)
            if callable(agree) and (self._pipeline is not None or t.early):
                agree()
        result = self._reader().restore(state, step, strict=strict)
        for t in self._snapshot_tiers():  # later snapshots are of an abandoned timeline
            forget = getattr(t, "forget_after", None)
            if callable(forget):
                forget(int(result))
        return result

    def _reader(self, *, durable: bool = False) -> CheckpointReader:
        """A reader over this Checkpointer's tiers (``durable``: not host memory) that
        reports what it learns to retention."""
        return CheckpointReader(
            self.root, tiers=self._readable(host=not durable), rank=self.rank, allow_pickle=self.options.allow_pickle,
            restore_rng=self.options.capture_rng, learn=self.committer.learn,
        )

    def _readable(self, *, host: bool = True) -> list[ReadableTier]:
        """The tiers restore reads, fastest first (``host``: snapshot tiers too)."""
        return [t for t in self.tiers.values() if host or not isinstance(t, SnapshotTier)]

    # ------------------------------------------------------------- discovery
    # Every answer comes from a CheckpointReader over this Checkpointer's tiers (the one
    # restore uses), so steps(), latest(), restore() and ``recoverkit ls`` see one set.
    def latest(self) -> int | None:
        """The newest step whose manifest and files verify on any tier, or None: the step
        :meth:`restore` would use (it is always in :meth:`steps`)."""
        return self._reader().latest()

    def steps(self) -> list[int]:
        """Every step committed on any tier, ascending (manifests not read).

        The tiers are the ones :meth:`restore` reads: this process's host snapshots (in a
        job of several ranks, those the last restore agreed on), the local tier and the
        persistent tier. Without
        the host snapshots, these are the steps ``recoverkit ls ROOT --persistent URL``
        lists and :meth:`CheckpointReader.steps <recoverkit.CheckpointReader.steps>`
        returns. A step listed here may still be skipped by a restore if its data is
        damaged (see :meth:`latest`). Which tier holds what: ``ckpt.tiers[name].steps()``.

        Example:
            >>> import tempfile, torch
            >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
            ...     _ = ckpt.save(1, {"w": torch.ones(2)}), ckpt.save(2, {"w": torch.ones(2)})
            ...     ckpt.steps(), ckpt.latest()
            ([1, 2], 2)
        """
        return self._reader().steps()

    def manifest(self, step: int) -> Manifest:
        """The verified manifest of ``step`` from the fastest durable tier holding a valid
        one (local, then persistent; host snapshots have no manifest of their own)."""
        return self._reader(durable=True).manifest(step)

    # ------------------------------------------------------------- lifecycle
    def close(self, *, keep_snapshots: bool = False) -> None:
        """Flush pending saves, stop the pipeline and release the run lock.

        A normal close ends the job: snapshots kept beyond the process (shared memory) are
        deleted. ``keep_snapshots=True`` keeps them for a process restarted on this node:
        leaving a ``with`` block on an exception does so, and so does ``protect`` after a
        preemption signal (a crash never gets here: they stay). The first close decides:
        closing again (a ``with`` block's exit after ``close``) deletes nothing.

        Raises:
            CommitError: after everything is closed and the lock released, if a save
                failed since the last report (as :meth:`wait` does). Leaving a ``with``
                block on an exception does not raise it (the failures were logged), so
                the original exception propagates.
        """
        failed: list[tuple[int, BaseException]] = []
        first, self._closed = not self._closed, True  # the first close decides about the snapshots
        try:
            if self._pipeline is not None:
                self._pipeline.flush()
                failed = self.take_failed_saves()
                self._pipeline.close()
                self._pipeline = None
        finally:
            try:
                for t in self._snapshot_tiers():
                    t.close()
                if first and not keep_snapshots:
                    for t in self._snapshot_tiers():
                        t.discard()
            finally:
                self._release_locks()
        if failed:
            raise _failed_saves_error(failed)

    def abandon(self, timeout_s: float) -> bool:
        """Close after the job's process group broke, keeping every snapshot; bounded.

        For in-process recovery (``recoverkit.elastic``): a rank was lost, the survivors
        formed a new group and build a new Checkpointer over the same root, which restores
        from the snapshots and replicas held in memory. This one is closed as
        ``close(keep_snapshots=True)`` would, on a daemon thread: pending saves settle into
        shared memory (given ``timeout_s``), then the tiers close, nothing in shared memory
        deleted. A replication's stop handshake with peers of the broken group rarely
        completes (a peer's thread ends when its group is destroyed), so past the pending
        saves the close gets at most :data:`ABANDON_PEERS_S` more; what is still running
        then (a replication stuck on the lost rank, a commit waiting for it) is left
        behind, logged, and the run lock released, so the new Checkpointer can take it.
        Failed saves are logged, not raised.

        Returns:
            True when everything closed in time without an error.

        Example:
            >>> import tempfile, torch
            >>> ckpt = Checkpointer(tempfile.mkdtemp())
            >>> ckpt.abandon(timeout_s=10.0)
            True
        """
        errors: list[BaseException] = []
        settled = threading.Event()

        def run() -> None:
            try:
                try:
                    self.settle(timeout_s)  # what is staged lands in shared memory first
                finally:
                    settled.set()
                self.close(keep_snapshots=True)
            except BaseException as e:  # noqa: BLE001 - reported below, on the caller's thread
                errors.append(e)

        deadline = time.monotonic() + timeout_s
        worker = threading.Thread(target=run, name="recoverkit-abandon", daemon=True)
        worker.start()
        settled.wait(timeout_s)
        worker.join(max(0.0, min(deadline - time.monotonic(), ABANDON_PEERS_S)))
        if worker.is_alive():
            log.warning(
                "recoverkit: rank %d: the Checkpointer did not close in time after the group broke "
                "(pending saves %s); left behind, its snapshots stay in shared memory",
                self.rank, "settled" if settled.is_set() else "not settled",
            )  # fmt: skip
            self._release_locks()
            return False
        if errors:
            log.warning("recoverkit: rank %d: closing the Checkpointer after the group broke: %s", self.rank, errors[0])
        return not errors

    def _release_locks(self) -> None:
        while True:  # pop is atomic: a close left behind on another thread may release too
            try:
                lock = self._locks.pop()
            except IndexError:
                return
            lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(keep_snapshots=True)  # the job may be restarted: its memory stays
        except CommitError as e:  # already logged; the exception in flight matters more
            log.debug("recoverkit: closing after %s: %s", getattr(exc_type, "__name__", exc_type), e)


def _failed_saves_error(failed: list[tuple[int, BaseException]]) -> CommitError:
    """One CommitError naming each failed step (the single failure's own error if only one)."""
    if len(failed) == 1 and isinstance(failed[0][1], CommitError):
        return failed[0][1]
    steps = ", ".join(str(s) for s, _ in failed)
    detail = "; ".join(f"step {s}: {e}" for s, e in failed)
    err = CommitError(f"{len(failed)} save(s) failed, steps {steps}: {detail}", step=failed[0][0])
    err.__cause__ = failed[0][1]
    return err


def _root_of(tier: ReadableTier) -> str | None:
    """The local directory a tier keeps its steps in, if it has one."""
    root = getattr(tier, "root", None)
    return root if isinstance(root, str) else None


def _where(tier: Tier, step: int) -> str:
    """Where ``step`` lies on ``tier``: a directory for a local tier, else its description."""
    step_path = getattr(tier, "step_path", None)
    return str(step_path(step)) if callable(step_path) else tier.describe(step)


def _check_step(step: int) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


class _Timer:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
        self.laps["total"] = now - self.t0
