"""Tier 1: one step's state staged in the host pool.

A :class:`HostSnapshot` owns a set of pool ranges. A large shard gets a range of its own;
small shards (under ``PACK_BELOW``) are packed next to each other, at their natural
alignment, into shared ranges of up to ``BLOCK_BYTES``, so many small tensors neither
take a pool page each nor one allocation each. Shards that the next optimizer step will
mutate (parameters, optimizer state) above ``eager_bytes`` are copied *lazily*: submitted
to the native copy engine, which copies them while training runs on, and the optimizer's
pre-step hook waits only for them. Everything else (small tensors, buffers the forward
pass may change, non-contiguous views) is copied during the call, a packed range's shards
in one gather. Every shard's CRC-32C is computed as it lands (by the engine, or right
after the eager copy). Source tensors stay referenced until their copy has landed.

The ranges come from the staging pool, or from a shared-memory slot the shm tier lent as
the save's arena (:class:`~recoverkit.staging.slot_arena.SlotArena`, same interface): then
the copies land in shared memory directly and :meth:`HostSnapshot.release` hands the slot
back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CopyError, PoolExhaustedError
from ..format.checksum import crc32c_ptr
from ..format.segment import PACK_ALIGNMENT, PACK_BELOW, align_up, natural_alignment
from ..state import to_bytes_view
from ..state.dtensor import local_of
from ..storage.base import RankPayload, ShardData
from .metrics import SaveMetrics
from .plan import PlannedShard, SavePlan
from .slot_arena import SlotArena

__all__ = ["BLOCK_BYTES", "HostSnapshot", "storage_id"]

#: the largest pool range that small shards share
BLOCK_BYTES = 8 << 20
_PAD = torch.zeros(PACK_ALIGNMENT, dtype=torch.uint8)  # alignment gaps inside a packed range


def storage_id(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (shared by views and pieces of one tensor); a
    DTensor's is its local shard's."""
    return int(local_of(t).untyped_storage().data_ptr())


@dataclass(eq=False)
class _Entry:
    shard: PlannedShard
    offset: int  # of its bytes in the pool
    nbytes: int
    block: int  # index of the pool range holding it
    storage: int = 0  # storage_id of the source; computed only for lazy candidates
    handle: Any = None  # engine CopyHandle while lazy
    source: torch.Tensor | None = None  # kept alive until the copy landed
    crc: int | None = None


def _pack(plan: SavePlan, alignment: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Pool ranges the plan needs and, per shard, (range, offset in it, nbytes)."""
    ranges: list[int] = []
    where: list[tuple[int, int, int]] = []
    block, used = -1, BLOCK_BYTES  # the open shared range and its bytes so far
    for p in plan.shards:
        n = p.nbytes
        if n >= PACK_BELOW:
            ranges.append(n)
            where.append((len(ranges) - 1, 0, n))
            continue
        a = natural_alignment(n)
        at = (used + a - 1) // a * a
        if at + n > BLOCK_BYTES:
            ranges.append(0)
            block, at = len(ranges) - 1, 0
        used = at + n
        ranges[block] = used
        where.append((block, at, n))
    return ranges, where


class HostSnapshot:
    """The staged copy of one step on this rank; see the module docstring."""

    def __init__(
        self, step: int, plan: SavePlan, pool: Any, engine: Any, *, metrics: SaveMetrics | None = None,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.step = step
        self.blob = plan.blob
        self.aliases = plan.aliases
        self.self_contained = plan.self_contained  # restores this rank without the others
        self._pool = pool
        self._engine = engine
        self._entries: list[_Entry] = []
        self._ranges: list[int] = []  # pool offsets this snapshot allocated
        self._sizes: list[int] = []  # bytes used in each
        self._lock = threading.Lock()
        self.released = False
        self.nbytes = len(plan.blob) + sum(p.nbytes for p in plan.shards)
        self.metrics = metrics or SaveMetrics()  # its save's (the guard charges waits there)
        self._on_release = on_release  # told once its ranges are back in the pool
        #: the shared-memory slot it is staged into (``pool`` is a SlotArena), else None
        self.arena: SlotArena | None = pool if isinstance(pool, SlotArena) else None
        #: the stager that staged it (a snapshot tier may lend it arenas: ``Stager.attach``)
        self.stager: Any = None

    @property
    def copier(self) -> Any:
        """The copy engine that staged it (restores copy out with it too)."""
        return self._engine

    def address(self, offset: int) -> int:
        """The address of a pool offset this snapshot holds."""
        return int(self._pool.address(offset))

    @property
    def entries(self) -> list[tuple[PlannedShard, int, int, int | None]]:
        """``(shard, pool offset, nbytes, crc32c)`` of every staged shard, in plan order."""
        return [(e.shard, e.offset, e.nbytes, e.crc) for e in self._entries]

    @staticmethod
    def footprint(plan: SavePlan, alignment: int) -> int:
        """Pool bytes the plan needs."""
        return sum(align_up(max(n, 1), alignment) for n in _pack(plan, alignment)[0])

    @staticmethod
    def slot_bytes(plan: SavePlan, alignment: int) -> int:
        """Bytes of a shared-memory slot the plan is staged into (the blob first, then its
        ranges at ``alignment``): what ``ShmTier.arena`` asks for."""
        return _slot_bytes(len(plan.blob), _pack(plan, alignment)[0], alignment)

    @property
    def arena_bytes(self) -> int:
        """:meth:`slot_bytes` of this snapshot (its ranges at its pool's alignment)."""
        return _slot_bytes(len(self.blob), self._sizes, self._pool.alignment)

    def allocate(self, plan: SavePlan) -> None:
        """Take pool ranges for every shard, or none (PoolExhaustedError)."""
        sizes, where = _pack(plan, self._pool.alignment)
        taken: list[int] = []
        try:
            for n in sizes:
                taken.append(self._pool.alloc(n))
        except PoolExhaustedError:
            for off in taken:
                self._pool.free(off)
            raise
        self._ranges, self._sizes = taken, sizes
        self._entries = [_Entry(p, taken[b] + at, n, b) for p, (b, at, n) in zip(plan.shards, where)]

    def start_copies(self, lazy_storages: set[int], eager_bytes: int) -> float:
        """Copy eager shards now (in this thread) and submit lazy ones to the engine.

        Eager shards that follow each other in one packed range are gathered into it with
        one ``torch.cat`` (a lazy shard between them ends the run: its bytes are the
        engine's to write); each shard's CRC-32C is taken right after. Returns the seconds
        spent copying eagerly.
        """
        t0 = time.perf_counter()
        eager: list[_Entry] = []
        run: list[_Entry] = []
        for e in self._entries:
            src = e.shard.source
            if e.nbytes > eager_bytes and lazy_storages:
                e.storage = storage_id(src)
                if (
                    e.storage in lazy_storages
                    and src.is_contiguous()
                    and src.device.type == "cpu"
                    and not src.is_conj()
                    and not src.is_neg()
                ):
                    e.source = src  # referenced until the copy lands
                    e.handle = self._engine.submit(int(src.data_ptr()), self._pool.address(e.offset), e.nbytes, crc=True)
                    if run:
                        self._gather(run)
                        run = []
                    continue
            if run and e.block != run[0].block:
                self._gather(run)
                run = []
            run.append(e)
            eager.append(e)
        if run:
            self._gather(run)
        for e in eager:
            e.crc = crc32c_ptr(self._pool.address(e.offset), e.nbytes) if e.nbytes else 0
        return time.perf_counter() - t0

    def _gather(self, entries: list[_Entry]) -> None:
        """Copy shards that follow each other in one pool range (apart from alignment gaps
        under 64 bytes, zero-filled) with one ``torch.cat``."""
        base = entries[0].offset
        parts: list[torch.Tensor] = []
        pos = base
        for e in entries:
            if e.offset > pos:
                parts.append(_PAD[: e.offset - pos])
            parts.append(_bytes_of(e.shard.source))
            pos = e.offset + e.nbytes
        if pos == base:
            return
        dst = torch.frombuffer(self._pool.view(base, pos - base), dtype=torch.uint8)
        if len(parts) == 1:
            dst.copy_(parts[0])
        else:
            torch.cat(parts, out=dst)

    def wait_storages(self, storages: set[int], timeout_s: float | None = None) -> None:
        """Block until every copy from the given storages has landed (the pre-step guard)."""
        for e in self._entries:
            if e.handle is not None and e.storage in storages:
                self._finish(e, timeout_s)

    def wait_all(self, timeout_s: float | None = None) -> None:
        for e in self._entries:
            if e.handle is not None:
                self._finish(e, timeout_s)

    def staged(self) -> bool:
        return all(e.handle is None or e.handle.done() for e in self._entries)

    def _finish(self, e: _Entry, timeout_s: float | None) -> None:
        handle = e.handle
        if handle is None:
            return
        try:
            crc = handle.result(timeout_s)
        except TimeoutError:
            raise
        except CopyError as err:
            raise CopyError(f"staging {e.shard.key!r} of step {self.step} failed: {err}") from err
        with self._lock:
            e.crc = int(crc)
            e.handle = None
            e.source = None

    def payload(self, rank: int) -> RankPayload:
        """The staged bytes as a tier payload (all copies must have landed)."""
        shards = []
        views: dict[int, torch.Tensor] = {}  # range -> its bytes, sliced per shard
        for e in self._entries:
            if e.handle is not None:
                raise RuntimeError(f"step {self.step}: {e.shard.key!r} is not staged yet")
            if e.nbytes:
                whole = views.get(e.block)
                if whole is None:
                    view = self._pool.view(self._ranges[e.block], self._sizes[e.block])
                    whole = views[e.block] = torch.frombuffer(view, dtype=torch.uint8)
                at = e.offset - self._ranges[e.block]
                data = whole[at : at + e.nbytes]
            else:
                data = torch.empty(0, dtype=torch.uint8)
            p = e.shard
            shards.append(ShardData(p.key, p.dtype, p.global_shape, p.offsets, p.shape, data, e.crc))
        return RankPayload(rank, self.blob, shards)

    def release(self) -> None:
        """Give the pool ranges (or the slot) back, after waiting for any copy still in flight."""
        with self._lock:
            if self.released:
                return
            self.released = True
        for e in self._entries:
            if e.handle is not None:
                e.handle.wait(None)
        for off in self._ranges:
            self._pool.free(off)
        self._entries = []
        self._ranges = []
        if self.arena is not None:
            self.arena.release()
        if self._on_release is not None:
            self._on_release()


def _slot_bytes(blob_bytes: int, range_sizes: list[int], alignment: int) -> int:
    return align_up(blob_bytes, alignment) + sum(align_up(max(n, 1), alignment) for n in range_sizes)


def _bytes_of(src: torch.Tensor) -> torch.Tensor:
    """A shard's bytes as a 1-D uint8 CPU tensor (copied to the CPU / made contiguous if needed)."""
    if not (src.is_cpu and src.is_contiguous() and not src.is_conj() and not src.is_neg()):
        src = src.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    flat = src if src.dim() == 1 else src.reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    try:
        return flat.view(torch.uint8)
    except RuntimeError:  # pragma: no cover - a dtype without a byte view
        return to_bytes_view(src)
