"""The bytes a memory restore gathered, readable as a tier: file ``rank-RRRRR.data`` -> owner R.

Where it sits: made by :class:`~recoverkit.recovery.memory.MemoryRestore` once every rank
verified every region it needs, and handed to ``use`` inside a
:class:`~recoverkit.recovery.tier_fallback.TierSource`, so the reader restores from it like
from any tier. Each owner's bytes are either a read-only map of a shared-memory slot on this
node (own snapshot, or a replica), this process's own host snapshot (its staging pool and
object blob), or a private buffer filled by the peer transport (its regions verified as they
landed).

:meth:`MemoryTier.read` copies and checks every CRC again while copying (a slot in shared
memory can be overwritten by a writer of a newer step meanwhile: that is caught, never
applied); :meth:`MemoryTier.memory_view` hands the restore's in-place path a read-only view
of a region that passed the verification, and nothing else. When every owner's bytes are
*stable* (nothing can write them until the restore ends: a private buffer, this process's
host snapshot), the tier says so (``views_verified``) and the in-place path copies the views
without checking their CRCs a second time.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.checksum import crc32c, crc32c_ptr, hexcrc
from ..format.manifest import Manifest, PackRecord
from ..storage.base import Buffer, ReadableTier, Region, destination

__all__ = ["Area", "MemoryTier", "OwnerBytes", "data_name"]


def data_name(owner: int) -> str:
    """The file name an owner rank's snapshot records use.

    Example:
        >>> data_name(3)
        'rank-00003.data'
    """
    return f"rank-{owner:05d}.data"


class Area(NamedTuple):
    """More of an owner's bytes held apart: owner offsets ``[base, base + data.nbytes)``."""

    base: int
    data: memoryview
    address: int


@dataclass
class OwnerBytes:
    """One owner rank's snapshot bytes as this rank holds them.

    Attributes:
        data: the bytes (a read-only view of a shared-memory slot, a host snapshot's pool,
            or a fetched buffer): the owner's offsets ``[base, base + data.nbytes)``.
        address: where ``data`` starts in this process's memory.
        where: where they come from, for messages ("own shm on node a", "replica on node b
            via rank 2").
        verified: the ``(offset, nbytes)`` regions whose CRC passed before anything was applied.
        close: releases what holds ``data`` (a slot's map, a buffer).
        base: the owner offset ``data`` starts at (a fetched span starts where it starts).
        stable: nothing can write these bytes until the restore ends (a private buffer; this
            process's own host snapshot), so a region verified once stays verified.
        extra: further areas of the owner's bytes (a host snapshot's object blob, which lies
            outside its pool).

    Example:
        >>> b = OwnerBytes(memoryview(b"abcdef"), 1000, "buffer", base=10)
        >>> bytes(b.locate(12, 3)[0]), b.locate(12, 3)[1], b.locate(4, 3)
        (b'cde', 1002, None)
    """

    data: memoryview
    address: int
    where: str
    verified: set[tuple[int, int]] = field(default_factory=set)
    close: Callable[[], None] = lambda: None
    base: int = 0
    stable: bool = False
    extra: tuple[Area, ...] = ()

    def locate(self, offset: int, nbytes: int) -> tuple[memoryview, int] | None:
        """The bytes ``[offset, offset + nbytes)`` of the owner and their address, if held
        (inside one area); None otherwise."""
        for base, data, address in (Area(self.base, self.data, self.address), *self.extra):
            if base <= offset and offset + nbytes <= base + data.nbytes:
                at = offset - base
                return data[at : at + nbytes], address + at
        return None


class MemoryTier(ReadableTier):
    """Step ``step`` of every owner rank's snapshot, from memory (see the module docstring).

    Example:
        >>> from recoverkit.format.manifest import BlobRecord, Manifest
        >>> import ctypes
        >>> data = bytearray(b"{}")
        >>> blob = BlobRecord(0, data_name(0), 0, 2, crc32c(data))
        >>> m = Manifest(step=5, run_id="r", world_size=1, blobs=(blob,), files={data_name(0): 2})
        >>> at = ctypes.addressof(ctypes.c_char.from_buffer(data))
        >>> tier = MemoryTier(m, {0: OwnerBytes(memoryview(data), at, "own shm", {(0, 2)})})
        >>> out = bytearray(2)
        >>> tier.read(5, [(blob, out)]); bytes(out)
        b'{}'
    """

    name = "memory"

    def __init__(self, manifest: Manifest, owners: Mapping[int, OwnerBytes]) -> None:
        self.step = manifest.step
        self._manifest = manifest
        self.owners = dict(owners)
        #: every view :meth:`memory_view` returns was verified against its record, and no
        #: writer can change it before the restore ends (in place skips its own CRC pass)
        self.views_verified = bool(self.owners) and all(b.stable for b in self.owners.values())
        self._where = {o: b.where for o, b in self.owners.items()}  # kept for messages after close
        self._packs: dict[PackRecord, bool] = {}

    def steps(self) -> list[int]:
        return [self.step]

    def manifest(self, step: int) -> Manifest:
        self._check_step(step)
        return self._manifest

    def describe(self, step: int) -> str:
        where = "; ".join(f"rank {o}'s snapshot from {w}" for o, w in sorted(self._where.items()))
        return f"memory snapshot of step {step} ({where})"

    def read(self, step: int, requests: Sequence[tuple[Region, Buffer]]) -> None:
        self._check_step(step)
        for rec, buf in requests:
            ptr = destination(buf, rec.nbytes, f"memory snapshot of step {step}")
            self._region(rec)  # inside the owner's bytes
            if rec.nbytes == 0:
                continue
            pack = getattr(rec, "pack", None)
            if pack is not None:  # no CRC of its own: its pack's, checked once over the source
                self._check_pack(pack)
            _, src = self._locate(rec)
            ctypes.memmove(ptr, src, rec.nbytes)
            if pack is None:
                found = crc32c_ptr(ptr, rec.nbytes)
                if found != rec.crc32c:
                    raise IntegrityError(
                        f"memory snapshot of step {step}: rank {rec.rank}'s bytes at {rec.offset} "
                        f"({self.owners[rec.rank].where}) have crc {hexcrc(found)}, recorded "
                        f"{hexcrc(rec.crc32c)}"
                    )

    def memory_view(self, step: int, rec: Region | PackRecord) -> memoryview | None:
        """A read-only view of ``rec``'s bytes (a pack's for a packed shard: ask for the
        :class:`PackRecord`) if they passed the verification before the restore began; None
        otherwise (the bytes then come through :meth:`read`). The caller checks the CRC again
        before it copies (see :meth:`ReadableTier.memory_view`), unless ``views_verified``."""
        if step != self.step:
            return None
        owner = self.owners.get(rec.rank)
        if owner is None or (rec.offset, rec.nbytes) not in owner.verified:
            return None
        return self._region(rec).toreadonly()

    def close(self) -> None:
        """Release every slot map and buffer (idempotent)."""
        owners, self.owners = self.owners, {}
        for b in owners.values():
            b.close()

    # ------------------------------------------------------------------ internals
    def _check_step(self, step: int) -> None:
        if step != self.step:
            raise CheckpointNotFoundError(f"memory holds step {self.step}, not {step}")

    def _region(self, rec: Region | PackRecord) -> memoryview:
        return self._locate(rec)[0]

    def _locate(self, rec: Region | PackRecord) -> tuple[memoryview, int]:
        owner = self.owners.get(rec.rank)
        if owner is None:
            raise CheckpointNotFoundError(
                f"memory snapshot of step {self.step}: rank {rec.rank}'s bytes were not gathered"
            )
        if rec.file != data_name(rec.rank) or rec.offset < 0 or rec.nbytes < 0:
            raise IntegrityError(f"memory snapshot of step {self.step}: record {rec} is not rank {rec.rank}'s")
        found = owner.locate(rec.offset, rec.nbytes)
        if found is None:
            raise IntegrityError(
                f"memory snapshot of step {self.step}: bytes [{rec.offset}, {rec.offset + rec.nbytes}) "
                f"lie outside rank {rec.rank}'s bytes held here ({owner.where})"
            )
        return found

    def _check_pack(self, pack: PackRecord) -> None:
        if pack in self._packs:
            return
        found = crc32c(self._region(pack))
        if found != pack.crc32c:
            raise IntegrityError(
                f"memory snapshot of step {self.step}: rank {pack.rank}'s pack at {pack.offset} has crc "
                f"{hexcrc(found)}, recorded {hexcrc(pack.crc32c)}"
            )
        self._packs[pack] = True

