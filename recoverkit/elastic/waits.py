"""What the elastic trainer makes of a failed or given-up collective: :class:`Lost`.

Where it sits: under :class:`~recoverkit.elastic.trainer.ElasticTrainer`'s reduction. The
waits themselves are :mod:`~recoverkit.distributed.global_grad`'s (every mode, the
trainer's loss all-reduce too), with ``abort=`` wired to the heartbeat: a survivor whose
pending collective never talks to the dead rank (the far side of a gloo ring, blocked
waiting for a send) is not woken by the dead rank's reset, nor by its neighbours closing
their connections; left alone it waits for the group's whole timeout (measured on this
machine: 14 of 15 s, where the survivors next to the dead rank failed in 10 ms). Polled and
asked between polls, it gives the collective up once a member stopped beating.
:func:`reducing` turns what such a wait raises into :class:`Lost`, by type, never by
message: ``PeerLostError`` (the heartbeat) and ``PeerTimeoutError`` (the wait ran out) leave
the collective pending (``abandoned=True``); any other error is the collective's own (a
peer's reset, the group's timeout, a peer's malformed contribution): it ended.

An abandoned operation still runs in the old group's thread until the group's timeout, and
freeing a group joins its threads: the trainer keeps a reference to an abandoned group
(:attr:`Lost.group`) for its own lifetime (one group per such recovery), so that neither the
re-forming nor the collector ever blocks on it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from ..errors import PeerLostError, PeerTimeoutError

__all__ = ["Lost", "reducing"]


class Lost(Exception):
    """A failure that a re-formed group may cure: a failed collective or a heartbeat miss.

    Attributes:
        how: what was seen, for the log.
        cause: the collective's exception, if any. :meth:`release` clears the frames it
            went through: their locals hold the failed work, which holds the old group,
            whose connections must close when the group is destroyed (a peer blocked
            receiving from this rank is woken only then).
        abandoned: a collective may still be pending on the old group (heartbeat miss,
            a wait that ran out): keep the group referenced (``group``), never join its threads.
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


@contextmanager
def reducing(what: str) -> Iterator[None]:
    """Turns a failure of the reduction run inside into :class:`Lost` (``what`` names it in
    the log): ``PeerLostError`` -> ``"heartbeat: ..."``, ``PeerTimeoutError`` ->
    ``"collective: ..."`` (both abandoned), ``RuntimeError`` (the collective's own error,
    :class:`~recoverkit.distributed.global_grad.OrderedGradSum`'s refusal of a peer's
    contribution) -> ``"collective (<what>): <error>"``.

    Example:
        >>> try:
        ...     with reducing("loss all-reduce"):
        ...         raise PeerLostError("the all-reduce given up while pending: launch rank(s) [2] stopped beating")
        ... except Lost as lost:
        ...     (lost.how, lost.abandoned)
        ('heartbeat: the all-reduce given up while pending: launch rank(s) [2] stopped beating', True)
    """
    try:
        yield
    except PeerLostError as e:
        raise Lost(f"heartbeat: {e}", e, abandoned=True) from None
    except PeerTimeoutError as e:
        raise Lost(f"collective: {e}", e, abandoned=True) from None
    except RuntimeError as e:
        raise Lost(f"collective ({what}): {_describe(e)}", e) from None
