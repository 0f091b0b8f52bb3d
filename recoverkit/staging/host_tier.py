"""Tier 1: the host cache of staged snapshots, and a tier restore reads from.

The drain offers each settled ``save_async`` to this tier; it keeps the newest ``keep``
snapshots in the staging pool (older ones, and any the pool needs for a new save, are
released). Restoring from them needs no disk: every region is copied out by the copy
engine and verified against the CRC-32C computed while staging.

A snapshot holds only this rank's shards (a replicated tensor is staged by its owner rank
only), so in a job of several ranks a step is restored from host memory across ranks: the
memory restore (``recovery.memory``, collective) gathers which steps every rank holds, and
each rank serves the regions others need from its own snapshot over the peer transport.
:meth:`HostTier.held_index` describes a snapshot for it as one rank's commit report (the
shared-memory index format: records at pool offsets, the object blob placed right after
the pool, :meth:`HostTier.areas`), which goes through ``build_manifest`` and the one gate
like any step. :meth:`HostTier.agree` (collective too) settles which steps every rank can
restore from its own snapshot alone (tier fallback then offers only those).
Nothing here survives the process: after a restart the tier holds nothing and restore goes
on to the shared-memory and disk tiers.

A restore into live tensors reads no copy at all: :meth:`HostTier.memory_view` hands out
read-only views of the staged ranges, which ``restore.in_place`` verifies (CRC-32C, every
region before the first byte lands) and copies straight into the targets.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..distributed.commit import LocalRank, build_manifest
from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.manifest import BlobRecord, Manifest, ShardRecord
from ..format.shm_index import ShmIndex, data_file, encode_index
from ..storage.base import Buffer, RankRecords, Region, destination
from .base import SnapshotTier
from .snapshot import HostSnapshot

__all__ = ["HostTier"]

_BLOB = "host:blob"
_POOL = "host:pool"


class HostTier(SnapshotTier):
    """The newest ``keep`` staged snapshots of this process, readable as a tier.

    Args:
        keep: snapshots kept (0: none; the tier then never holds a step).
        run_id: the run id written into the manifests it builds.
        rank: this process's rank (its snapshots hold its part only).
        world_size: ranks in the job; above 1, only agreed steps are offered
            (:meth:`agree`).
        agree: ``agree(held_steps) -> steps every rank holds`` (the Checkpointer's
            coordinator exchange, bounded by its timeout); needed when ``world_size > 1``.
        engine: the engine a restore in place verifies and copies with (the Checkpointer's;
            None: the process-wide one).
        coordinator: the job's coordinator (the memory restore across ranks; None: the
            process's default one).
        timeout_s: how long an exchange with the other ranks may take (the memory restore).
    """

    name = "host"

    def __init__(
        self,
        *,
        keep: int = 1,
        run_id: str = "",
        rank: int = 0,
        world_size: int = 1,
        agree: Callable[[list[int]], list[int]] | None = None,
        engine: Any = None,
        coordinator: Any = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.keep = keep
        self.coordinator = coordinator
        self.timeout_s = timeout_s
        #: snapshots offered so far: saves are collective, so every rank saw as many (none:
        #: no rank holds anything, and a memory restore needs no exchange)
        self.offered = 0
        #: step -> (snapshot, index bytes, index) of the last snapshot described
        self._indexes: dict[int, tuple[HostSnapshot, bytes, ShmIndex]] = {}
        self.engine = engine
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self._agree = agree
        self._lock = threading.Lock()
        self._snaps: deque[HostSnapshot] = deque()
        self._agreed: set[int] = set()  # steps every rank holds (world_size > 1)
        # the snapshot whose staged extents (pool offset, nbytes) were looked up last
        self._extents: tuple[HostSnapshot | None, frozenset[tuple[int, int]]] = (None, frozenset())

    # ------------------------------------------------------------ the cache
    def offer(self, snap: HostSnapshot) -> bool:
        self.offered += 1
        if self.keep <= 0 or snap.released:
            return False
        dropped = []
        with self._lock:
            self._snaps.append(snap)
            while len(self._snaps) > self.keep:
                dropped.append(self._snaps.popleft())
        for old in dropped:
            old.release()
        return True

    def withdraw(self, snap: HostSnapshot) -> None:
        with self._lock:
            try:
                self._snaps.remove(snap)  # by identity: snapshots do not define ==
            except ValueError:
                return  # never kept, or already evicted
        snap.release()

    def evict_one(self) -> bool:
        with self._lock:
            if not self._snaps:
                return False
            old = self._snaps.popleft()
        old.release()
        return True

    def close(self) -> None:
        with self._lock:
            snaps, self._snaps = list(self._snaps), deque()
        for s in snaps:
            s.release()

    def held(self) -> list[int]:
        """Steps this rank holds in memory, ascending (whatever the other ranks hold)."""
        with self._lock:
            return sorted(s.step for s in self._snaps if not s.released)

    def agree(self) -> list[int]:
        """Every rank: settle which held steps every rank holds (collective; a world of one
        needs no exchange). Returns them; only they are offered for restore until the next
        call.

        A rank offers only the snapshots that restore it alone (``self_contained``: none of
        the tensors it needs was written by another rank, e.g. a replicated tensor another
        rank owns), so that every rank restores the agreed step from its own memory.
        """
        with self._lock:
            held = sorted(s.step for s in self._snaps if not s.released and s.self_contained)
        if self.world_size <= 1:
            return held
        if self._agree is None:
            self._agreed = set()
            return []
        agreed = set(self._agree(held)) & set(held)
        self._agreed = agreed
        return sorted(agreed)

    # ------------------------------------------------------------ the tier
    def snapshot(self, step: int) -> HostSnapshot:
        """The held snapshot of ``step`` (CheckpointNotFoundError if none)."""
        return self._snap(step)

    def held_index(self, step: int) -> tuple[bytes, ShmIndex]:
        """The held snapshot of ``step`` as this rank's commit report: the bytes of an index
        in the shared-memory format (``format.shm_index``) and the index, for the memory
        restore across ranks. Every record names ``rank-RRRRR.data``: shards at their pool
        offsets, the object blob right after the pool (:meth:`areas`). Cached per snapshot.
        CheckpointNotFoundError if not held; ValueError if a copy has not landed."""
        snap = self._snap(step)
        cached = self._indexes.get(step)
        if cached is not None and cached[0] is snap:
            return cached[1], cached[2]
        entries = snap.entries
        if any(crc is None for _, _, _, crc in entries):
            raise ValueError(f"host snapshot of step {step}: a copy has not landed")
        pool_bytes = self._pool_of(snap).capacity
        r, file = self.rank, data_file(self.rank)
        records = RankRecords(
            rank=r,
            blob=BlobRecord(r, file, pool_bytes, len(snap.blob), crc32c(snap.blob, engine=self.engine)),
            shards=[(p.key, ShardRecord(r, file, off, n, int(crc or 0), p.offsets, p.shape)) for p, off, n, crc in entries],
            files={file: pool_bytes + len(snap.blob)},
        )
        raw, index = encode_index(
            step=step, run_id=self.run_id, world_size=self.world_size, rank=r, records=records,
            shards_meta=[p for p, _, _, _ in entries], aliases=snap.aliases, data_bytes=pool_bytes + len(snap.blob),
            self_contained=snap.self_contained,
        )
        assert index is not None  # records given as an object: the index comes with its bytes
        self._indexes = {step: (snap, raw, index)}  # one kept: the step a restore asks for
        return raw, index

    def areas(self, step: int) -> tuple[memoryview, int, memoryview, int]:
        """The bytes :meth:`held_index` describes: the whole pool (read-only) and its address,
        the object blob and its address. CheckpointNotFoundError if not held."""
        snap = self._snap(step)
        pool = self._pool_of(snap)
        blob_at = ctypes.cast(ctypes.c_char_p(snap.blob), ctypes.c_void_p).value or 0
        return pool.view(0, pool.capacity).toreadonly(), snap.address(0), memoryview(snap.blob), blob_at

    @staticmethod
    def _pool_of(snap: HostSnapshot) -> Any:
        return snap._pool  # noqa: SLF001 (the snapshot's pool has no public accessor yet)

    def _snap(self, step: int) -> HostSnapshot:
        with self._lock:
            for snap in self._snaps:
                if snap.step == step and not snap.released:
                    return snap
        raise CheckpointNotFoundError(f"no host snapshot of step {step}")

    def steps(self) -> list[int]:
        held = self.held()
        return held if self.world_size <= 1 else [s for s in held if s in self._agreed]

    def manifest(self, step: int) -> Manifest:
        snap = self._snap(step)
        entries = snap.entries
        r = self.rank
        records = RankRecords(
            rank=r,
            blob=BlobRecord(r, _BLOB, 0, len(snap.blob), crc32c(snap.blob)),
            shards=[
                (p.key, ShardRecord(r, _POOL, off, n, int(crc or 0), p.offsets, p.shape))
                for p, off, n, crc in entries
            ],
            files={},
        )
        mine = LocalRank(records, [p for p, _, _, _ in entries], snap.aliases)
        return build_manifest(
            step=step, run_id=self.run_id, world_size=self.world_size, ranks=[mine]
        )

    def read(self, step: int, requests: Sequence[tuple[Region, Buffer]]) -> None:
        """Copy each region out with the copy engine (its threads, CRC on the fly: one pass
        over the bytes) and check every CRC against the one computed while staging."""
        snap = self._snap(step)
        copies: list[tuple[Region, Any]] = []
        for rec, buf in requests:
            ptr = destination(buf, rec.nbytes, f"host snapshot of step {step}")
            if rec.nbytes == 0:
                continue
            if rec.file == _BLOB:
                src = ctypes.cast(ctypes.c_char_p(snap.blob), ctypes.c_void_p).value or 0
            else:
                src = snap.address(rec.offset)
            copies.append((rec, snap.copier.submit(src, ptr, rec.nbytes, crc=True)))
        for _, h in copies:  # every copy has landed (or failed) before anything is judged
            h.wait()
        for rec, h in copies:
            found = h.result()
            if found != rec.crc32c:
                raise IntegrityError(
                    f"host snapshot of step {step}: region at {rec.offset} has crc {hexcrc(found)}, "
                    f"staged {hexcrc(rec.crc32c)}"
                )

    def memory_view(self, step: int, rec: Region) -> memoryview | None:
        """A read-only view of a staged region of ``step`` (its pool range, or the blob).

        Only the exact regions this tier's manifest lists are served: a record whose
        ``(offset, nbytes)`` is not one of the snapshot's staged shards is ValueError, so no
        view reaches past what the snapshot holds. The bytes are not verified here (the
        caller checks them against ``rec.crc32c``). CheckpointNotFoundError if the step is
        not held.

        Example:
            >>> tier = HostTier(keep=0)
            >>> tier.memory_view(3, BlobRecord(0, "host:blob", 0, 1, 0))
            Traceback (most recent call last):
            ...
            recoverkit.errors.CheckpointNotFoundError: no host snapshot of step 3
        """
        held = self._extents[0]  # the snapshot asked last: one lookup per step, not per region
        snap = held if held is not None and held.step == step and not held.released else self._snap(step)
        if rec.file == _BLOB:
            if rec.offset != 0 or rec.nbytes != len(snap.blob):
                raise ValueError(
                    f"host snapshot of step {step}: blob region [{rec.offset}, +{rec.nbytes}) is not the "
                    f"staged blob of {len(snap.blob)} bytes"
                )
            return memoryview(snap.blob).toreadonly()
        if rec.file != _POOL or (rec.offset, rec.nbytes) not in self._staged(snap):
            raise ValueError(
                f"host snapshot of step {step}: region {rec.file!r} [{rec.offset}, +{rec.nbytes}) is not "
                "a staged shard of it"
            )
        if rec.nbytes == 0:
            return memoryview(b"")
        # the pool's own view holds the arena: the bytes stay mapped while the view lives
        return snap._pool.view(rec.offset, rec.nbytes).toreadonly()  # noqa: SLF001 (no public view yet)

    def _staged(self, snap: HostSnapshot) -> frozenset[tuple[int, int]]:
        """``(pool offset, nbytes)`` of every shard ``snap`` staged (an empty one may share
        its offset with the next); cached for the last snapshot asked."""
        held, extents = self._extents
        if held is not snap:
            extents = frozenset((off, n) for _, off, n, _ in snap.entries)
            self._extents = (snap, extents)
        return extents

    def describe(self, step: int) -> str:
        return f"host snapshot of step {step}"
