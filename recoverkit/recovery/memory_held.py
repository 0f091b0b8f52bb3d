"""Where a rank finds snapshot copies for a memory restore: its node's shared memory, its own host memory.

Where it sits: under :mod:`recoverkit.recovery.memory` (the protocol across ranks), over the
tiers that hold the bytes (``storage.shm`` slots of the shared-memory and replica tiers;
``staging.host_tier``'s staged snapshots). Each :class:`HeldSource` is one *place* a rank
reads from without a transfer::

    ShmSource    place = the node's name: every rank of the node maps the same slots
                 (own snapshots and replicas), copies survive the process
    HostSource   place = "host:rank-RRRRR": only this process reads its staging pool;
                 nothing survives the process (a restore after a restart finds none)

Both report what they hold the same way (:class:`~recoverkit.recovery.memory_plan.HeldCopy`:
owner, step, the CRC of its index), and open a copy as a :class:`HeldView`: its index (one
owner's commit report for one step, in the shared-memory index format, which rank 0 and
every rank turn into the step's manifest through the one gate), its bytes for this rank's
restore and the ranges it sends to others.

Example:
    >>> HostSource.place_of(3)
    'host:rank-00003'
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import IntegrityError
from ..format.checksum import crc32c
from ..format.shm_index import ShmIndex
from ..storage.shm import ShmStore
from .memory_plan import HeldCopy, scan
from .memory_source import Area, OwnerBytes

__all__ = ["HeldSource", "HeldView", "HostSource", "ShmSource"]


class HeldView:
    """One opened copy of one owner's snapshot of one step.

    Attributes:
        index_bytes: its index as written (its CRC names the copy in the protocol).
        index: that index, decoded and validated.
        replica: whether it is a replica (a copy another rank's snapshot sent here).
        place: the place it was found in.
        path: where it is, for messages.
    """

    def __init__(
        self, index_bytes: bytes, index: ShmIndex, *, replica: bool, place: str, path: str,
        owner_bytes: Callable[[str], OwnerBytes], send_view: Callable[[int, int], memoryview],
        close: Callable[[], None],
    ) -> None:
        self.index_bytes, self.index, self.replica, self.place, self.path = index_bytes, index, replica, place, path
        self._owner_bytes, self._send_view, self._close = owner_bytes, send_view, close
        self.closed = False

    def owner_bytes(self, where: str) -> OwnerBytes:
        """Its bytes for this rank's restore (their ``close`` closes this view)."""
        return self._owner_bytes(where)

    def memory_view(self, offset: int, nbytes: int) -> memoryview:
        """The owner's bytes ``[offset, offset + nbytes)``, read-only, for a send (no copy);
        ValueError outside what can be sent."""
        return self._send_view(offset, nbytes)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()


class HeldSource(ABC):
    """One place a rank reads snapshot copies from without a transfer.

    Attributes:
        place: its name in the protocol (a node's name, or ``host:rank-RRRRR``).
        kind: "shm" or "host", for messages.
    """

    place: str
    kind: str

    @property
    def takes_part(self) -> bool:
        """Whether this source may hold a copy: False only when nothing can be held on any
        rank (a host tier of a process that staged nothing: saves are collective), so a
        restore with only such sources needs no exchange."""
        return True

    @abstractmethod
    def scan(self) -> list[HeldCopy]:
        """Every complete copy this place holds."""

    @abstractmethod
    def open(self, owner: int, step: int, crc: int) -> HeldView:
        """The copy of ``owner``'s ``step`` whose index has CRC ``crc`` (own snapshot before a
        replica); IntegrityError or OSError when this place no longer holds it."""


class ShmSource(HeldSource):
    """The node's shared memory: every job dir of ``stores`` (shm tier, replica tier)."""

    kind = "shm"

    def __init__(self, stores: Sequence[ShmStore]) -> None:
        self.stores = list(stores)
        self.place = stores[0].node

    def scan(self) -> list[HeldCopy]:
        return scan(self.stores)

    def open(self, owner: int, step: int, crc: int) -> HeldView:
        for store, replica in ((st, r) for r in (False, True) for st in self.stores):
            try:
                v = store.slots(owner, replica=replica).open(step)
            except (IntegrityError, OSError):
                continue
            if crc32c(v.index_bytes) == crc:
                return self._view(v)
            v.close()
        raise IntegrityError(f"node {self.place} no longer holds rank {owner}'s snapshot of step {step}")

    def _view(self, v: Any) -> HeldView:
        def owner_bytes(where: str) -> OwnerBytes:
            return OwnerBytes(v.data, v.address, where, close=held.close)

        held = HeldView(
            v.index_bytes, v.index, replica=bool(v.slots.replica), place=self.place, path=v.path,
            owner_bytes=owner_bytes, send_view=v.memory_view, close=v.close,
        )
        return held


class HostSource(HeldSource):
    """This process's host snapshots (``staging.host_tier.HostTier``): its own rank's only.

    The bytes are the staging pool (records at pool offsets) and the object blob, which the
    index places right after the pool; both stay as they are until the next save, so a
    region verified once stays verified (``stable``).
    """

    kind = "host"

    def __init__(self, host: Any) -> None:
        self.host = host
        self.place = self.place_of(host.rank)

    @staticmethod
    def place_of(rank: int) -> str:
        return f"host:rank-{rank:05d}"

    @property
    def takes_part(self) -> bool:
        return bool(self.host.offered)

    def scan(self) -> list[HeldCopy]:
        out = []
        for step in self.host.held():
            try:
                raw, idx = self.host.held_index(step)
            except (IntegrityError, LookupError, ValueError):  # evicted meanwhile, or incomplete
                continue
            out.append(HeldCopy(idx.rank, False, step, crc32c(raw), len(raw), idx.data_bytes, idx.run_id, idx.world_size))
        return out

    def open(self, owner: int, step: int, crc: int) -> HeldView:
        if owner != self.host.rank:
            raise IntegrityError(f"{self.place} holds rank {self.host.rank}'s snapshots only, not rank {owner}'s")
        try:
            raw, idx = self.host.held_index(step)
            pool, pool_at, blob, blob_at = self.host.areas(step)
        except (LookupError, ValueError) as e:
            raise IntegrityError(f"{self.place} no longer holds step {step}: {e}") from None
        if crc32c(raw) != crc:
            raise IntegrityError(f"{self.place}: the snapshot of step {step} is not the copy chosen")
        blob_area = Area(pool.nbytes, blob, blob_at)

        def owner_bytes(where: str) -> OwnerBytes:
            return OwnerBytes(pool, pool_at, where, close=held.close, stable=True, extra=(blob_area,))

        def send_view(offset: int, nbytes: int) -> memoryview:
            if offset < 0 or nbytes < 0 or offset + nbytes > pool.nbytes:
                raise ValueError(f"{self.place}: [{offset}, +{nbytes}) is not inside the pool")
            return pool[offset : offset + nbytes]

        held = HeldView(raw, idx, replica=False, place=self.place, path=f"host snapshot of step {step}",
                        owner_bytes=owner_bytes, send_view=send_view, close=lambda: None)  # fmt: skip
        return held
