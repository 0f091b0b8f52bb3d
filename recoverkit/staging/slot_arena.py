"""A shared-memory slot as one save's staging arena: the shm tier's copy-free path.

Where it sits: between the stager (``staging.stager``) and the shm tier
(``staging.shm_tier``). When the shm tier is due for a save and one of its slots is free,
the stager allocates the save's ranges from that slot instead of the staging pool, so the
eager copies and the engine's lazy copies land in shared memory directly and the CRCs they
compute on the fly are the records' CRCs::

    save_async(step)  ShmTier.arena(step, plan) -> slots.begin(step, nbytes, hold=True)
                      (index deleted: torn until the commit) -> SlotArena
                      HostSnapshot allocates its ranges from it; copies land in the slot
    drain             staged -> ShmTier.offer: blob + index written (no second copy, no
                      second CRC pass); disk tiers write from the same ranges, the host
                      tier may keep the snapshot
    release           HostSnapshot.release -> SlotArena.release -> writer.release(): the
                      slot may be taken again; its committed snapshot stays listed until then

A :class:`SlotArena` has the staging pool's interface as far as a
:class:`~recoverkit.staging.snapshot.HostSnapshot` uses it (``alloc`` / ``free`` /
``address`` / ``view`` / ``alignment`` / ``capacity``): a bump allocator over the slot,
ranges at the pool's alignment after the blob (which the shm tier writes at offset 0). It
serves one snapshot; ``free`` gives nothing back, :meth:`SlotArena.release` ends it.

Example:
    >>> import tempfile
    >>> from recoverkit.storage.shm import ShmStore
    >>> store = ShmStore(tempfile.mkdtemp(), shm_dir=tempfile.mkdtemp(), node="n0", budget_bytes=1 << 20)
    >>> arena = SlotArena(store.slots(0).begin(7, 3 * 4096, hold=True), alignment=4096, base=10)
    >>> arena.alloc(100), arena.alloc(4000), arena.capacity
    (4096, 8192, 12288)
    >>> arena.release(); store.remove_job()
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import PoolExhaustedError
from ..format.segment import align_up
from ..storage.shm import SlotWriter

__all__ = ["SlotArena"]


class SlotArena:
    """One save's ranges in one shared-memory slot (see the module docstring).

    Args:
        writer: the slot, begun with ``hold=True`` (held until :meth:`release`).
        alignment: every range's alignment (the staging pool's).
        base: bytes reserved at offset 0 (the blob's).
        tier: the tier that handed it out (it commits the index; ``None`` in tests).
    """

    def __init__(self, writer: SlotWriter, *, alignment: int, base: int = 0, tier: Any = None) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if not 0 <= base <= writer.data_bytes:
            raise ValueError(f"base {base} lies outside the slot's {writer.data_bytes} bytes")
        self.writer = writer
        self.step = writer.step
        self.alignment = alignment
        self.capacity = writer.data_bytes
        self.base = base
        self.tier = tier
        self._view: memoryview | None = writer.view  # keeps the mapping alive while copies land
        self._address = writer.address
        self._next = base
        self._lock = threading.Lock()
        self.released = False

    def alloc(self, nbytes: int) -> int:
        """The offset of ``nbytes`` new bytes at ``alignment``; PoolExhaustedError past the slot."""
        if type(nbytes) is not int or nbytes < 0:
            raise ValueError(f"nbytes must be an integer >= 0, got {nbytes!r}")
        with self._lock:
            if self.released:
                raise ValueError(f"the arena of step {self.step} is released")
            at = align_up(self._next, self.alignment)
            if at + nbytes > self.capacity:
                raise PoolExhaustedError(
                    f"slot of step {self.step}: {nbytes} bytes at {at} do not fit its {self.capacity} bytes"
                )
            self._next = at + nbytes
            return at

    def free(self, offset: int) -> None:
        """Nothing is given back range by range: :meth:`release` ends the whole arena."""

    @property
    def used(self) -> int:
        """Bytes up to the end of the last range."""
        return self._next

    def _check(self, offset: int, nbytes: int) -> None:
        if self._view is None:
            raise ValueError(f"the arena of step {self.step} is released")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.capacity:
            raise ValueError(f"[{offset}, +{nbytes}) lies outside the slot's {self.capacity} bytes")

    def address(self, offset: int) -> int:
        """The address of ``offset`` in the mapped slot."""
        self._check(offset, 0)
        return self._address + offset

    def view(self, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` at ``offset``, writable (a view of the shared mapping)."""
        self._check(offset, nbytes)
        assert self._view is not None
        return self._view[offset : offset + nbytes]

    def release(self) -> None:
        """The snapshot is done with the slot (every copy landed or waited for): a writer
        may take it again. Its committed snapshot, if any, stays listed until then."""
        with self._lock:
            if self.released:
                return
            self.released = True
            self._view = None
        self.writer.release()

    def __repr__(self) -> str:
        return f"SlotArena(step={self.step}, slot={self.writer.slot}, {self._next}/{self.capacity} bytes)"
