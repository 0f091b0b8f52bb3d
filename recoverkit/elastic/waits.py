"""Collective waits that a heartbeat can cut short, and the SUM all-reduce that uses them.

Where it sits: under :class:`~recoverkit.elastic.trainer.ElasticTrainer`'s reduction.
A survivor whose pending collective never talks to the dead rank (the far side of a gloo
ring, blocked waiting for a send to complete) is not woken by the dead rank's reset, nor by
its neighbours closing their connections; left alone it waits for the group's whole timeout
(measured on this machine: 14 of 15 s, where the survivors next to the dead rank failed in
10 ms). :func:`wait` polls the work (``work.wait(timeout=poll_s)``, which gloo honours
while the operation goes on in its thread) and asks the heartbeat between polls; once a
member stopped beating it gives the collective up as :class:`Lost` with ``abandoned=True``.

An abandoned operation still runs in the old group's thread until the group's timeout, and
freeing a group joins its threads: the trainer keeps a reference to an abandoned group
(:attr:`Lost.group`) for its own lifetime (one group per such recovery), so that neither the
re-forming nor the collector ever blocks on it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Lost", "wait", "allreduce_sum"]


class Lost(Exception):
    """A failure that a re-formed group may cure: a failed collective or a heartbeat miss.

    Attributes:
        how: what was seen, for the log.
        cause: the collective's exception, if any. :meth:`release` clears the frames it
            went through: their locals hold the failed work, which holds the old group,
            whose connections must close when the group is destroyed (a peer blocked
            receiving from this rank is woken only then).
        abandoned: a collective may still be pending on the old group (heartbeat miss,
            poll deadline): keep the group referenced (``group``), never join its threads.
        group: the old group, kept alive when ``abandoned``.
    """

    def __init__(self, how: str, cause: BaseException | None = None, *, abandoned: bool = False) -> None:
        super().__init__(how)
        self.how = how
        self.cause = cause
        self.abandoned = abandoned
        self.group: Any = dist.group.WORLD if abandoned and dist.is_initialized() else None
        self.wall = time.time()
        self.mono = time.monotonic()

    def release(self) -> None:
        """Clears the locals of the finished frames this failure and its cause went through
        (call it where the failure is caught): they hold the failed work, which holds the
        old group. Frames still executing are left alone."""
        seen: set[int] = set()
        e: BaseException | None = self
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if e.__traceback__ is not None:
                traceback.clear_frames(e.__traceback__)
            e = e.__cause__ or e.__context__ or (e.cause if isinstance(e, Lost) else None)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def wait(work: Any, what: str, *, poll_s: float, timeout_s: float, lost: Callable[[], str | None]) -> None:
    """Waits for ``work``: returns when it completed, raises :class:`Lost` when it failed, when
    ``lost()`` names a loss between polls (abandoned), or after ``timeout_s`` (abandoned)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            work.wait(timeout=timedelta(seconds=poll_s))
            return
        except RuntimeError as e:
            if work.is_completed():  # it ended with an error: a peer reset, gloo's own timeout
                raise Lost(f"collective ({what}): {_describe(e)}", e) from None
        why = lost()
        if why is not None:
            raise Lost(f"heartbeat ({what} pending): {why}", abandoned=True)
        if time.monotonic() >= deadline:
            raise Lost(f"collective ({what}): not completed within {timeout_s} s", abandoned=True)


def allreduce_sum(
    tensors: Iterable[torch.Tensor], what: str, *, divide_by: int = 1, **wait_kw: Any
) -> None:
    """SUM all-reduce of ``tensors`` over the default group, in place, one flat buffer per
    dtype and device, each wait through :func:`wait` (``divide_by``: the shrink mode's mean).

    The same reduction as :func:`~recoverkit.distributed.global_grad.allreduce_grads_sum`,
    whose waits cannot be cut short by a heartbeat.
    """
    items = list(tensors)
    kinds: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in items:
        kinds.setdefault((t.dtype, t.device), []).append(t)
    for parts in kinds.values():
        flat = torch.cat([t.reshape(-1) for t in parts])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
        wait(work, what, **wait_kw)
        if divide_by != 1:
            flat /= divide_by
        offset = 0
        for t in parts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
