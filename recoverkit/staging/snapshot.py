"""Tier 1: one step's state staged in the host pool.

A :class:`HostSnapshot` owns a set of pool ranges, one per planned shard. Shards that the
next optimizer step will mutate (parameters, optimizer state) above ``eager_bytes`` are
copied *lazily*: submitted to the native copy engine, which copies them while training
runs on, and the optimizer's pre-step hook waits only for them. Everything else (small
tensors, buffers the forward pass may change, non-contiguous views) is copied during the
call. The engine computes each shard's CRC-32C as it copies. Source tensors stay
referenced until their copy has landed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..dist.dtensor import local_of
from ..errors import CopyError, PoolExhaustedError
from ..format.checksum import crc32c_ptr
from ..format.segment import align_up
from ..state import to_bytes_view
from ..storage.base import RankPayload, ShardData
from .plan import PlannedShard, SavePlan

__all__ = ["HostSnapshot", "storage_id"]


def storage_id(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (shared by views and pieces of one tensor); a
    DTensor's is its local shard's."""
    return int(local_of(t).untyped_storage().data_ptr())


@dataclass
class _Entry:
    shard: PlannedShard
    offset: int  # in the pool
    nbytes: int
    storage: int
    handle: Any = None  # engine CopyHandle while lazy
    source: torch.Tensor | None = None  # kept alive until the copy landed
    crc: int | None = None


class HostSnapshot:
    """The staged copy of one step on this rank; see the module docstring."""

    def __init__(self, step: int, plan: SavePlan, pool: Any, engine: Any) -> None:
        self.step = step
        self.blob = plan.blob
        self.aliases = plan.aliases
        self._pool = pool
        self._engine = engine
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self.released = False
        self.nbytes = len(plan.blob) + sum(p.nbytes for p in plan.shards)
        self.metrics: dict[str, Any] = {"prestep_wait_s": 0.0}  # the handle's metrics

    def charge_wait(self, seconds: float) -> None:
        """Account time the training loop spent waiting for this snapshot's copies."""
        with self._lock:
            self.metrics["prestep_wait_s"] = self.metrics.get("prestep_wait_s", 0.0) + seconds

    @staticmethod
    def footprint(plan: SavePlan, alignment: int) -> int:
        """Pool bytes the plan needs."""
        return sum(align_up(max(p.nbytes, 1), alignment) for p in plan.shards)

    def allocate(self, plan: SavePlan) -> None:
        """Take pool ranges for every shard, or none (PoolExhaustedError)."""
        taken: list[_Entry] = []
        try:
            for p in plan.shards:
                off = self._pool.alloc(p.nbytes)
                taken.append(_Entry(p, off, p.nbytes, storage_id(p.source)))
        except PoolExhaustedError:
            for e in taken:
                self._pool.free(e.offset)
            raise
        self._entries = taken

    def start_copies(self, lazy_storages: set[int], eager_bytes: int) -> float:
        """Copy eager shards now (in this thread) and submit lazy ones to the engine.

        Returns the seconds spent copying eagerly.
        """
        t0 = time.perf_counter()
        for e in self._entries:
            src = e.shard.source
            lazy = (
                e.storage in lazy_storages
                and e.nbytes > eager_bytes
                and src.is_contiguous()
                and src.device.type == "cpu"
                and not src.is_conj()
                and not src.is_neg()
            )
            if lazy:
                e.source = src  # referenced until the copy lands
                e.handle = self._engine.submit(int(src.data_ptr()), self._pool.address(e.offset), e.nbytes, crc=True)
                continue
            src = src.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            if e.nbytes:
                dst = torch.frombuffer(self._pool.view(e.offset, e.nbytes), dtype=torch.uint8)
                dst.copy_(to_bytes_view(src))
            e.crc = crc32c_ptr(self._pool.address(e.offset), e.nbytes) if e.nbytes else 0
        return time.perf_counter() - t0

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
        for e in self._entries:
            if e.handle is not None:
                raise RuntimeError(f"step {self.step}: {e.shard.key!r} is not staged yet")
            view = self._pool.view(e.offset, e.nbytes) if e.nbytes else memoryview(b"")
            data = torch.frombuffer(view, dtype=torch.uint8) if e.nbytes else torch.empty(0, dtype=torch.uint8)
            p = e.shard
            shards.append(ShardData(p.key, p.dtype, p.global_shape, p.offsets, p.shape, data, e.crc))
        return RankPayload(rank, self.blob, shards)

    def release(self) -> None:
        """Give the pool ranges back (after waiting for any copy still in flight)."""
        with self._lock:
            if self.released:
                return
            self.released = True
        for e in self._entries:
            if e.handle is not None:
                e.handle.wait(None)
            self._pool.free(e.offset)
        self._entries = []
