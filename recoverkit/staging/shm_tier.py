"""Tier 1b: every staged step copied into shared memory, where a crash does not take it.

Where it sits: the drain offers each staged ``save_async`` to this tier right after staging
(it is an *early* snapshot tier), before the disk commits. Two paths; the first whenever it
can be taken::

    staged in place   save_async: the stager asks :meth:`ShmTier.arena` for a free slot and
                      stages the save into it (``staging.slot_arena``: the engine's copies
                      land in shared memory, their CRCs are the records')
                      offer: the blob and the index (format.shm_index) written, index last
    copied            the save was staged into the pool (no slot was free, or the step was
                      not expected): pool --copy engine, CRC on the fly--> slot (mmap),
                      every CRC checked against the staged one -> index written last

so the step is complete in shared memory even if the process dies while the disk commit
runs. A slot lent as an arena stays pinned until the snapshot is released by every user
(the disk tiers, the host tier); its snapshot is listed as soon as its index is written.
A slot is lent only once this process maps it with room for the save (the copy path
creates, grows and maps slots, on the drain thread), so a process's first saves are copied.
Whether a save is due here is known to the stager when the caller passes the tiers due;
otherwise this tier predicts it from the steps it was offered (every ``g`` steps, ``g`` the
last gap; every step after the first offer): a miss costs a pool staging and a copy, or a
slot staged but never committed (torn; the older snapshot it held is gone, the newest never
is). Counted in :attr:`ShmTier.in_place` and :attr:`ShmTier.copied`. Once a save due here
was staged into the pool, later saves are not lent a slot until it was offered (the copy
needs a slot; a newer save taking it would supersede it), so every step offered still lands
in shared memory as before. Should a pool-staged save find no free slot because a newer one
was lent (a step not expected), it is superseded by that newer step (counted,
:attr:`ShmTier.superseded`), as a replication that cannot keep up is.

A process restarted on the same node with the same root (torchrun ``--max-restarts``, the
user's relaunch) finds the slots again: this tier lists their steps and restores from them
like any tier (``steps`` / ``manifest`` / ``read``, and ``memory_view`` for restores
straight into live tensors). The snapshot's run id may be an earlier run's: restore does not
compare run ids.

A snapshot holds one rank's part. In a world of one it is the whole state; in a job of
several ranks, :meth:`ShmTier.agree` (collective, like the host tier's) offers only the
steps every rank holds and can restore from its own memory alone; the memory restore across
ranks (``recovery.memory``) builds on :attr:`ShmTier.store` for the rest.

Lifecycle: the regions stay when the process dies or is stopped by a signal (the restarted
process needs them) and are removed by :meth:`ShmTier.discard` when the Checkpointer closes
normally; ``recoverkit gc ROOT --yes`` removes those of a job that is gone.

Example:
    >>> import tempfile, torch
    >>> from recoverkit import CheckpointOptions, Checkpointer, TierSpec
    >>> root, shm = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> opts = CheckpointOptions(tiers=[TierSpec.shm(shm_dir=shm), TierSpec.local(every_steps=0)])
    >>> w = torch.arange(4.0)
    >>> with Checkpointer(root, options=opts) as ckpt:
    ...     _ = ckpt.save_async(1, {"w": w}); _ = ckpt.wait()
    ...     ckpt.tiers["shm"].steps()
    [1]
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _native
from ..distributed.commit import build_manifest
from ..distributed.coordinator import Coordinator
from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.dtypes import itemsize as dtype_itemsize
from ..format.manifest import BlobRecord, Manifest, ShardRecord
from ..format.segment import align_up
from ..format.shm_index import ShmIndex, data_file, encode_index
from ..format.validate import check_manifest
from ..storage.base import Buffer, RankRecords, Region, destination
from ..storage.faults import FaultInjector
from ..storage.shm import ShmStore, SlotBusyError, SnapshotView
from .base import SnapshotTier
from .plan import SavePlan
from .slot_arena import SlotArena
from .snapshot import HostSnapshot

__all__ = ["ShmTier"]

log = logging.getLogger("recoverkit")

#: shards of at least this many bytes are copied alone, to a page of the slot (CRC on the
#: fly); smaller ones in runs of at most ``_RUN_BYTES``, each checked where it landed
_PAGE_FROM = 64 << 10
_RUN_BYTES = 8 << 20


class ShmTier(SnapshotTier):
    """This rank's per-step snapshots in shared memory (see the module docstring).

    Args:
        store: the node's shared memory for this root (its own slots are ``rank``'s).
        run_id: the run id written into the indexes (a restore accepts an earlier run's).
        rank, world_size: this process's place in the job.
        coordinator: the job's coordinator (agreement across ranks; the memory restore).
        timeout_s: how long an exchange with the other ranks may take.
        engine: the engine module whose copy engine reads snapshots back out.
        faults: told of ``shm_stage`` (a slot lent as a save's arena, nothing staged yet),
            ``shm_copy`` (copies submitted, not yet landed; staged in place: landed) and
            ``shm_index`` (bytes verified, index not yet written), with the step and rank.
        agree: ``agree(held_steps) -> steps every rank holds`` (world_size > 1).
    """

    name = "shm"
    early = True

    def __init__(
        self,
        store: ShmStore,
        *,
        run_id: str = "",
        rank: int = 0,
        world_size: int = 1,
        coordinator: Coordinator | None = None,
        timeout_s: float = 300.0,
        engine: Any = None,
        faults: FaultInjector | None = None,
        agree: Callable[[list[int]], list[int]] | None = None,
    ) -> None:
        self.store = store
        self.slots = store.slots(rank)
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self.coordinator = coordinator
        self.timeout_s = timeout_s
        self.faults = faults or FaultInjector()
        self._engine = engine
        self._agree = agree
        self._agreed: set[int] = set()
        self._lock = threading.Lock()
        self._views: dict[int, SnapshotView] = {}
        self._reading = 0  # reads in progress (their views stay open)
        self._copier: Any = None
        #: offers that failed (each also logged by the drain); the save went on
        self.failed_writes = 0
        #: snapshots written by this process
        self.written = 0
        #: of them, staged straight into their slot / copied from the pool into it
        self.in_place = 0
        self.copied = 0
        #: arenas asked for and not lent (no free slot, over the budget)
        self.arena_misses = 0
        #: saves staged into the pool that found no free slot because a newer save was
        #: staged into one meanwhile (that newer step is written instead; not a failure)
        self.superseded = 0
        self._newest_lent = -1  # the newest step lent a slot
        #: the newest step expected here but staged into the pool: until a step as new is
        #: offered, no later save is lent a slot (it would take the slot the copy needs)
        self._pool_pending = -1
        self._last_offer: int | None = None  # the newest step offered
        self._offer_gap: int | None = None  # the gap between the last two offered steps

    @property
    def file(self) -> str:
        """The file name every record of this rank's snapshots names."""
        return data_file(self.rank)

    # ------------------------------------------------------------ writing
    def expects(self, step: int) -> bool:
        """Whether ``step`` will probably be offered here: it is past the last step offered
        and, once two were, a multiple of their gap past it. (After one offer a miss costs
        nothing: the newest snapshot is never lent, and no older one of this run exists.)"""
        with self._lock:
            last, gap = self._last_offer, self._offer_gap
        return last is not None and step > last and (gap is None or (step - last) % gap == 0)

    def arena(self, step: int, plan: SavePlan, alignment: int, *, due: bool | None = None) -> SlotArena | None:
        """The stager: a free slot to stage ``step`` into, held until the snapshot is
        released; None when the step is not due (``due`` None: :meth:`expects`) or no slot
        is free (each holds the newest snapshot, is pinned or in use) or ready: a slot is lent
        only once mapped here with room for the save (the copy path, on the drain thread,
        creates, grows and maps slots; nothing of that runs in ``save_async``).

        The slot's index is deleted here: it is torn until :meth:`offer` writes it.
        """
        if not (self.expects(step) if due is None else due):
            return None
        with self._lock:  # an earlier save staged into the pool is not written yet: it goes first
            last = -1 if self._last_offer is None else self._last_offer
            if self._pool_pending > last:
                self._pool_pending = max(self._pool_pending, step)
                self.arena_misses += 1
                return None
        nbytes = HostSnapshot.slot_bytes(plan, alignment)
        self._close_views(idle_only=True)
        try:
            w = self.slots.begin(step, nbytes, hold=True, mapped_only=True)
        except (OSError, ValueError) as e:  # SlotBusyError, the budget (ENOSPC): the pool path
            with self._lock:
                self._pool_pending = max(self._pool_pending, step)
            self.arena_misses += 1
            log.debug("recoverkit: step %d: no shared-memory slot to stage into: %s", step, e)
            return None
        try:
            self.faults.reached("shm_stage", step=step, rank=self.rank)
            arena = SlotArena(w, alignment=alignment, base=len(plan.blob), tier=self)
            with self._lock:
                self._newest_lent = max(self._newest_lent, step)
            return arena
        except BaseException:
            w.release()
            raise

    def offer(self, snap: HostSnapshot) -> bool:
        """Write ``snap`` into a slot (staged in place: its index only; else copied, every
        CRC verified, then the index); False (the caller keeps the snapshot). Raises on
        failure (the slot stays torn, never listed)."""
        if snap.released:
            return False
        self._noted(snap)
        in_place = snap.arena is not None and snap.arena.tier is self
        if not in_place:
            self._close_views(idle_only=True)
        try:
            if in_place:
                assert snap.arena is not None
                self._commit_staged(snap, snap.arena)
            else:
                self._write(snap)
        except SlotBusyError as e:
            with self._lock:
                newer = self._newest_lent > snap.step
            if not newer:
                self.failed_writes += 1
                raise
            self.superseded += 1  # the slots hold the newest and a newer save staged in place
            log.debug("recoverkit: step %d not written to shared memory: superseded by a newer save (%s)", snap.step, e)
            return False
        except BaseException:
            self.failed_writes += 1
            raise
        self.written += 1
        if in_place:
            self.in_place += 1
        else:
            self.copied += 1
        return False

    def _noted(self, snap: HostSnapshot) -> None:
        """Learn the offer schedule, and lend arenas to the stager that staged ``snap``."""
        with self._lock:
            if self._last_offer is not None:
                self._offer_gap = snap.step - self._last_offer if snap.step > self._last_offer else None
            self._last_offer = snap.step
        if snap.stager is not None and callable(getattr(snap.stager, "attach", None)):
            snap.stager.attach(self)

    def _commit_staged(self, snap: HostSnapshot, arena: SlotArena) -> None:
        """``snap`` was staged into its slot: write the blob, then the index from the CRCs
        computed as the bytes landed (no second copy, no second pass)."""
        w = arena.writer
        step, rank, file, blob = snap.step, self.rank, self.file, snap.blob
        if step != w.step or len(blob) > arena.base:
            raise IntegrityError(f"step {step}: staged into the slot of step {w.step} with room for {arena.base} blob bytes")
        if blob:
            arena.view(0, len(blob))[:] = blob
        self.faults.reached("shm_copy", step=step, rank=rank)
        entries = snap.entries
        shards = []
        for p, off, n, crc in entries:
            if crc is None:
                raise IntegrityError(f"step {step}: {p.key!r} has no staged CRC")
            shards.append((p.key, ShardRecord(rank, file, off, n, crc, p.offsets, p.shape)))
        records = RankRecords(rank, BlobRecord(rank, file, 0, len(blob), crc32c(blob)), shards, {file: w.data_bytes})
        raw, index = encode_index(
            step=step, run_id=self.run_id, world_size=self.world_size, rank=rank, records=records,
            shards_meta=[p for p, _, _, _ in entries], aliases=snap.aliases, data_bytes=w.data_bytes,
            self_contained=snap.self_contained,
        )
        self.faults.reached("shm_index", step=step, rank=rank)
        w.commit(raw, index=index)  # the slot stays held (pinned) until the snapshot is released

    def _write(self, snap: HostSnapshot) -> None:
        entries = snap.entries
        blob = snap.blob
        runs, offsets, data_bytes = _layout(entries, len(blob))
        step, copier, rank, file = snap.step, snap.copier, self.rank, self.file
        crc_at = _native.resolve(self._engine).crc32c_ptr
        w = self.slots.begin(step, data_bytes, room=snap.arena_bytes)  # room to stage a later save in place
        copies: list[Any] = []
        try:
            if blob:
                src = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0
                copies.append(copier.submit(src, w.address, len(blob), crc=True))
            for run in runs:  # a large shard alone (CRC on the fly), small ones a run at a time
                crc = run.count == 1 and run.nbytes >= _PAGE_FROM
                copies.append(copier.submit(snap.address(run.src), w.address + run.dst, run.nbytes, crc=crc))
            self.faults.reached("shm_copy", step=step, rank=self.rank)
            landed = [h.result() for h in copies]
            blob_crc = landed[0] if blob else 0
            on_the_fly = {run.first: c for run, c in zip(runs, landed[1 if blob else 0 :]) if run.count == 1 and run.nbytes >= _PAGE_FROM}
            shards = []
            for i, ((p, _, n, staged), dst) in enumerate(zip(entries, offsets)):
                found = on_the_fly.get(i)
                if found is None:  # copied within a run: checked where it landed
                    found = int(crc_at(w.address + dst, n)) if n else 0
                if staged is None or found != staged:
                    raise IntegrityError(
                        f"step {step}: {p.key!r} copied to shared memory with crc {hexcrc(found)}, staged "
                        f"{'none' if staged is None else hexcrc(staged)}"
                    )
                shards.append((p.key, ShardRecord(rank, file, dst, n, found, p.offsets, p.shape)))
            records = RankRecords(rank, BlobRecord(rank, file, 0, len(blob), blob_crc), shards, {file: data_bytes})
            raw, index = encode_index(
                step=step, run_id=self.run_id, world_size=self.world_size, rank=self.rank, records=records,
                shards_meta=[p for p, _, _, _ in entries], aliases=snap.aliases, data_bytes=data_bytes,
                self_contained=snap.self_contained,
            )
            self.faults.reached("shm_index", step=step, rank=self.rank)
            w.commit(raw, index=index)  # built here from verified records: not parsed back
        except BaseException:
            for h in copies:  # nothing writes into the slot once it is given back
                h.wait(None)
            w.abort()
            raise

    def withdraw(self, snap: HostSnapshot) -> None:
        """Its save failed on every tier: the step is not offered from shared memory either."""
        self._close_views(idle_only=True, step=snap.step)
        self.slots.invalidate(snap.step)

    def forget_after(self, step: int) -> None:
        """The job resumed from ``step``: this rank's snapshots of later steps belong to a
        timeline that was abandoned (a crashed run's, or a rollback's) and are made
        unselectable, so a later restore never mixes them with this run's."""
        self._close_views(idle_only=True)
        for later in [s for s in self.slots.steps() if s > step]:
            self.slots.invalidate(later)

    def evict_one(self) -> bool:
        return False  # holds no pool memory

    def close(self) -> None:
        """Unmap what this process mapped; the snapshots stay in shared memory."""
        self._close_views(idle_only=False)
        with self._lock:
            copier, self._copier = self._copier, None
        if copier is not None:
            copier.close()
        self.store.close()

    def discard(self) -> None:
        """The job ended normally: delete this rank's slots and the replicas this store
        holds (never another rank's own slots, which that rank deletes), then the job's
        directory once nothing else is left in it."""
        self.close()
        for s in self.store.handed_out():
            if s is self.slots or s.replica:
                s.clear()
        self.store.remove_if_empty()

    # ------------------------------------------------------------ reading
    def _held(self) -> dict[int, ShmIndex]:
        """Complete snapshots of this job's world size, by step."""
        return {i.step: i for i in self.slots.indexes() if i.world_size == self.world_size}

    def agree(self) -> list[int]:
        """Every rank: settle which steps every rank holds and can restore from its own
        snapshot alone (collective; a world of one needs no exchange)."""
        held = sorted(s for s, i in self._held().items() if i.self_contained)
        if self.world_size <= 1:
            return held
        agreed = set(self._agree(held)) & set(held) if self._agree is not None else set()
        self._agreed = agreed
        return sorted(agreed)

    def steps(self) -> list[int]:
        held = sorted(self._held())
        return held if self.world_size <= 1 else [s for s in held if s in self._agreed]

    def index(self, step: int) -> ShmIndex:
        """The validated index of this rank's snapshot of ``step``."""
        idx = self._held().get(step)
        if idx is None:
            raise CheckpointNotFoundError(f"no shared-memory snapshot of step {step} in {self.slots.dir}")
        return idx

    def manifest(self, step: int) -> Manifest:
        """The step's manifest from this rank's index (world of one: through the one gate,
        ``format.validate``; several ranks: every shard's geometry checked)."""
        idx = self.index(step)
        records = RankRecords(idx.rank, idx.blob, list(idx.shards), dict(idx.files))
        try:
            m = build_manifest(step=step, run_id=idx.run_id, world_size=idx.world_size, ranks=[(records, idx.meta)])
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{self.describe(step)}: malformed index ({e})") from None
        if idx.world_size == 1:
            check_manifest(m, where=self.describe(step))
        else:
            _check_geometry(m, self.describe(step))
        return m

    def _view(self, step: int) -> SnapshotView:
        with self._lock:
            v = self._views.get(step)
            if v is None or v.closed:
                v = self._views[step] = self.slots.open(step)
            return v

    def _close_views(self, *, idle_only: bool, step: int | None = None) -> None:
        with self._lock:
            if idle_only and self._reading:
                return
            doomed = [s for s in self._views if step is None or s == step]
            views = [self._views.pop(s) for s in doomed]
        for v in views:
            v.close()  # unmapped once the memoryviews handed out are gone; pinned till then

    def _region(self, step: int, rec: Region, view: SnapshotView) -> None:
        if rec.file != self.file or rec.offset < 0 or rec.nbytes < 0 or rec.offset + rec.nbytes > view.index.data_bytes:
            raise IntegrityError(
                f"{self.describe(step)}: region {rec.file!r} [{rec.offset}, +{rec.nbytes}) is not inside "
                f"{self.file!r} ({view.index.data_bytes} bytes)"
            )

    def read(self, step: int, requests: Sequence[tuple[Region, Buffer]]) -> None:
        """Copy each region out of the mapped slot with the copy engine (CRC on the fly) and
        check every CRC against the index's."""
        with self._lock:
            self._reading += 1
        try:
            view = self._view(step)
            copier = self._copier_()
            copies: list[tuple[Region, Any]] = []
            try:
                for rec, buf in requests:
                    ptr = destination(buf, rec.nbytes, self.describe(step))
                    self._region(step, rec, view)
                    if rec.nbytes:
                        copies.append((rec, copier.submit(view.address + rec.offset, ptr, rec.nbytes, crc=True)))
            finally:
                for _, h in copies:
                    h.wait(None)
            for rec, h in copies:
                found = h.result()
                if found != rec.crc32c:
                    raise IntegrityError(
                        f"{self.describe(step)}: region at {rec.offset} has crc {hexcrc(found)}, "
                        f"recorded {hexcrc(rec.crc32c)}"
                    )
        finally:
            with self._lock:
                self._reading -= 1

    def memory_view(self, step: int, rec: Region) -> memoryview | None:
        """A read-only view of ``rec``'s bytes in the mapped slot (bounds-checked, not
        verified: the caller checks the CRC). It pins the slot until it is released."""
        view = self._view(step)
        self._region(step, rec, view)
        return view.memory_view(rec.offset, rec.nbytes)

    def _copier_(self) -> Any:
        with self._lock:
            if self._copier is None:
                self._copier = _native.resolve(self._engine).CopyEngine(2)
            return self._copier

    def describe(self, step: int) -> str:
        return f"shared-memory snapshot of step {step} ({self.slots.dir})"


@dataclass
class _Run:
    """Pool bytes copied into the slot as one piece: a large shard, or small shards that lie
    next to each other in the pool (packed ranges), gaps included."""

    first: int  # index of its first entry
    src: int  # pool offset
    dst: int  # slot offset
    nbytes: int
    count: int = 1


def _layout(entries: Sequence[tuple[Any, int, int, Any]], blob_bytes: int) -> tuple[list[_Run], list[int], int]:
    """The copies (runs), each entry's offset in the slot, and the slot's size.

    The blob comes first. Runs follow in pool order: a shard of at least ``_PAGE_FROM``
    bytes alone, on a page of the slot; small shards joined while the next starts less
    than a page after the previous one ended (in the pool nothing else can lie there: ranges
    are page-granular) and the run stays under ``_RUN_BYTES``. A run keeps its bytes'
    offsets modulo 64, so every shard keeps its alignment.
    """
    offsets = [0] * len(entries)
    runs: list[_Run] = []
    at, end = blob_bytes, 0  # end: the pool offset the open run reaches
    for i in sorted(range(len(entries)), key=lambda i: entries[i][1]):
        _, off, n, _ = entries[i]
        run = runs[-1] if runs else None
        if (
            run is not None and n < _PAGE_FROM and run.nbytes < _RUN_BYTES and (run.count > 1 or run.nbytes < _PAGE_FROM)
            and end <= off < end + 4096
        ):  # fmt: skip
            run.nbytes = off + n - run.src
            run.count += 1
        else:
            if run is not None:
                at = run.dst + run.nbytes
            dst = align_up(at, 4096) if n >= _PAGE_FROM else align_up(at, 64) + off % 64
            run = _Run(i, off, dst, n)
            runs.append(run)
        offsets[i] = run.dst + off - run.src
        end = off + n
    if runs:
        at = runs[-1].dst + runs[-1].nbytes
    runs = [r for r in runs if r.nbytes]
    return runs, offsets, at


def _check_geometry(m: Manifest, where: str) -> None:
    """One rank's part of a step (it cannot cover the tensors of others): every shard has a
    known dtype, lies inside its tensor and records ``numel x itemsize`` bytes."""
    for key, t in m.tensors.items():
        if t.alias_of is not None:
            continue
        size = dtype_itemsize(t.dtype)
        for s in t.shards:
            if len(s.offsets) != len(t.shape) or len(s.shape) != len(t.shape) or any(
                o < 0 or n < 0 or o + n > g for o, n, g in zip(s.offsets, s.shape, t.shape)
            ):
                raise IntegrityError(f"{where}: tensor {key!r}: shard {list(s.offsets)}+{list(s.shape)} is outside {list(t.shape)}")
            if math.prod(s.shape) * size != s.nbytes:
                raise IntegrityError(f"{where}: tensor {key!r}: shard of shape {list(s.shape)} records {s.nbytes} bytes")
