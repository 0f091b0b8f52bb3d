"""The checkpoint-overhead benchmark's methods: one checkpointing method each, driven by the same loop.

Where it sits: the bottom of ``bench_overhead`` (:mod:`bench.bench_overhead` is the entry point),
below its ranks (:mod:`bench._overhead_world`), which build one method at a time and drive it
through :class:`bench._overhead_world._Loop`. The flow: every method is a :class:`_Method`; the
loop calls ``before_step`` after forward+backward (the time waited is charged to the step),
``save`` after the optimizer step, ``busy`` while an earlier checkpoint's background work runs
(how long a window lasts), and reads ``stalls`` (the training time each checkpoint cost) before
``drain`` and ``close``. :class:`_Recoverkit` is ``save_async`` (host + local disk, or the memory
tiers of :func:`memory_tiers`, or the host tier only), :class:`_Blocking` a ``torch.save`` or
``dcp.save`` call, :class:`_AsyncSave` ``dcp.async_save`` with a reused stager. The method names
(:data:`METHODS`, :data:`TORCHFT`, :data:`OPT_IN`) are here, so every later stage names them the
same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ._common import keep_last

__all__ = ["METHODS", "TORCHFT", "OPT_IN", "memory_tiers", "_Method", "_Recoverkit", "_Blocking", "_AsyncSave"]

METHODS = ("recoverkit", "recoverkit_memory", "torch_save", "dcp_save", "dcp_async_save")
#: a separate world of its own (bench._torchft), run after the cell's when torchft is installed
TORCHFT = "torchft"
#: accepted by ``--methods``, not run by default
OPT_IN = ("recoverkit_host",)


# --------------------------------------------------------------------------- methods
class _Method:
    """One checkpointing method driven by the same loop: before_step / save / busy / close."""

    name = ""

    def before_step(self) -> float:
        """Called after forward+backward, before the optimizer step; returns seconds waited."""
        return 0.0

    def save(self, step: int) -> float:
        """Starts or does a checkpoint after the optimizer step; returns seconds spent waiting."""
        raise NotImplementedError

    def busy(self) -> bool:
        """True while background work of an earlier checkpoint is still running."""
        return False

    def stalls(self) -> list[float]:
        """Training stall of every checkpoint so far (needs the step after each one)."""
        raise NotImplementedError

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def memory_tiers(world: int) -> list[Any]:
    """``recoverkit_memory``'s tiers: shared memory every step, + a peer replica every step
    when there is another node (world 2: one rank per simulated node)."""
    from recoverkit import TierSpec

    tiers = [TierSpec.shm()]  # type: ignore[attr-defined]
    if world > 1:
        tiers.append(TierSpec.replica(k=1))  # type: ignore[attr-defined]
    return tiers


class _Recoverkit(_Method):
    """``recoverkit``: host snapshot + local disk every checkpoint; ``recoverkit_memory``: the
    memory tiers of :func:`memory_tiers` only (no disk)."""

    name = "recoverkit"

    def __init__(self, root: str, state: dict[str, Any], nbytes: int, tiers: list[Any] | None = None,
                 name: str = "recoverkit") -> None:
        from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy, TierSpec
        from recoverkit.config import StagingPolicy

        self.name = name
        pieces = nbytes // (64 << 20) + 128
        self.budget_bytes = 2 * (nbytes + pieces * 4096) + (16 << 20)
        opts = CheckpointOptions(
            retention=RetentionPolicy(keep_last=1),
            tiers=tiers or [TierSpec.host(keep=1), TierSpec.local(every_steps=1)],
            staging=StagingPolicy(budget_bytes=self.budget_bytes),
        )
        self.ckpt = Checkpointer(root, options=opts)
        # the memory the method may take: the staging pool + every shared-memory store's budget
        self.budget_bytes += sum(int(getattr(getattr(t, "store", None), "budget_bytes", 0) or 0)
                                 for t in self.ckpt.tiers.values())
        self.state = state
        self.handles: list[Any] = []

    def save(self, step: int) -> float:
        h = self.ckpt.save_async(step, self.state)
        self.handles.append(h)
        return h.metrics.get("call_s", 0.0)

    def busy(self) -> bool:
        return bool(self.handles) and not self.handles[-1].done()

    def stalls(self) -> list[float]:
        return [h.metrics.get("call_s", 0.0) + h.metrics.get("prestep_wait_s", 0.0) for h in self.handles]

    def drain(self) -> None:
        self.ckpt.wait()
        for h in self.handles:
            h.wait()

    def close(self) -> None:
        self.drain()
        staged = [h.metrics.get("staged_in") for h in self.handles]
        self.info = {"skipped_saves": self.ckpt.skipped_saves,
                     # saves staged straight into a shared-memory slot / into the staging pool
                     "staged_in_shm": staged.count("shm"), "staged_in_pool": staged.count("pool")}
        shm = self.ckpt.tiers.get("shm")
        if shm is not None:  # shm snapshots written in place / copied from the pool
            self.info.update(shm_in_place=getattr(shm, "in_place", 0), shm_copied=getattr(shm, "copied", 0))
        self.ckpt.close()


class _Blocking(_Method):
    def __init__(self, name: str, fn: Callable[[int], str], rank0_only: bool, rank: int) -> None:
        self.name, self.fn, self.rank0_only, self.rank = name, fn, rank0_only, rank
        self.times: list[float] = []
        self.kept: list[str] = []

    def save(self, step: int) -> float:
        t = time.perf_counter()
        if not self.rank0_only or self.rank == 0:
            self.kept.append(self.fn(step))
            keep_last(self.kept, 1)
        dt = time.perf_counter() - t
        self.times.append(dt)
        return dt

    def stalls(self) -> list[float]:
        return list(self.times)

    def close(self) -> None:
        keep_last(self.kept, 0)


class _AsyncSave(_Method):
    name = "dcp_async_save"

    def __init__(self, base: str, get_state: Callable[[], dict[str, Any]], pg: Any) -> None:
        from ._lazy_phases import _dcp_stager

        self.base, self.get_state, self.pg = base, get_state, pg
        self.stager, self.options = _dcp_stager()
        self.resp: Any = None
        self.call: list[float] = []
        self.stage_wait: list[float] = []
        self.upload_wait: list[float] = []
        self.dirs: list[str] = []
        self._staged = True

    def before_step(self) -> float:
        if self._staged or self.resp is None:
            return 0.0
        fut = getattr(self.resp, "staging_completion", None)
        t = time.perf_counter()
        if fut is not None:
            fut.result()
        dt = time.perf_counter() - t
        self.stage_wait[-1] += dt
        self._staged = True
        return dt

    def _upload(self) -> Any:
        return getattr(self.resp, "upload_completion", self.resp)

    def save(self, step: int) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        waited = 0.0
        if self.resp is not None:
            t = time.perf_counter()
            self._upload().result()
            waited = time.perf_counter() - t
            self.upload_wait[-1] += waited
            keep_last(self.dirs, 1)
        d = os.path.join(self.base, f"dcp-async-{step:06d}")
        kwargs: dict[str, Any] = {"checkpoint_id": d, "process_group": self.pg, "async_checkpointer_type": AsyncCheckpointerType.THREAD}
        if self.stager is not None:
            kwargs["async_stager"] = self.stager
        t = time.perf_counter()
        self.resp = dcp.async_save(self.get_state(), **kwargs)
        dt = time.perf_counter() - t
        self.call.append(dt)
        self.stage_wait.append(0.0)
        self.upload_wait.append(0.0)
        self.dirs.append(d)
        self._staged = getattr(self.resp, "staging_completion", None) is None
        return waited + dt

    def busy(self) -> bool:
        if self.resp is None:
            return False
        fut = self._upload()
        return not fut.done()

    def stalls(self) -> list[float]:
        # save() charges the upload wait before save j+1 to save j
        return [c + s + u for c, s, u in zip(self.call, self.stage_wait, self.upload_wait)]

    def drain(self) -> None:
        if self.resp is not None:
            self.before_step()
            self._upload().result()

    def close(self) -> None:
        self.drain()
        if self.stager is not None:
            self.stager.close()
        keep_last(self.dirs, 0)

