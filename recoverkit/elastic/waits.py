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

:func:`recovering` is the same classification for the collectives of a recovery itself (the
agreement on the completed step, a sharded model's rebuild, DDP's construction on the new
group): a second rank lost there is a :class:`Lost` too, and the trainer re-forms again.
recoverkit's own errors other than the two above (``RegroupError``, which is also a
``RuntimeError``; ``IntegrityError``; every ``RecoverkitError``) propagate unchanged there:
they say that in-process recovery is impossible, not that a peer was lost.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerLostError, PeerTimeoutError, RecoverkitError

__all__ = ["Lost", "reducing", "recovering", "RecoveryCollectiveError", "lost_peer", "release_group"]


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


def release_group() -> None:
    """Destroys the failed default group (its state is dropped even if it is broken).

    Not followed by a full ``gc.collect()``: freeing the group would close its connections
    and wake a peer blocked *receiving* from this rank (measured outside the trainer: ~0.2 s
    instead of the group's timeout), but in the trainer the group outlived a full collection
    (a holder outside Python's reach), so the collection only cost 0.1-0.6 s of every
    recovery on a loaded 2-core machine. Far-side survivors are woken by the heartbeat.
    """
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - a broken group: its state is dropped all the same
            pass


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


@contextmanager
def recovering(what: str, *, backend: bool = False) -> Iterator[None]:
    """:func:`reducing` for a collective of the recovery itself, run on the group just
    formed (``what`` names it): a lost peer there is a :class:`Lost`, so the trainer
    re-forms again. Classified by type and origin: ``PeerLostError`` and ``PeerTimeoutError``
    (both abandoned: the group is kept referenced) and :class:`RecoveryCollectiveError`, which
    the recovery's own waits raise for a collective that was given up or failed in the
    backend (:func:`lost_peer`); with ``backend=True`` (code
    whose collectives run inside torch, e.g. DDP's construction) also a ``RuntimeError`` that
    is neither a :class:`~recoverkit.errors.RecoverkitError` nor ``torch.OutOfMemoryError``
    (the backend's own error: a peer's reset, the group's timeout). Everything else
    propagates unchanged: a local failure (an allocation, a user's ``wrap``) is not a lost
    peer and must not make every survivor wait for it; so does every other
    ``RecoverkitError`` (``RegroupError``: "diverged", "restore", a store lost, this rank
    left out; ``IntegrityError``, ``CommitError``, ...).

    Example:
        >>> from recoverkit.errors import RegroupError
        >>> try:
        ...     with recovering("DDP's construction", backend=True):
        ...         raise RuntimeError("Connection reset by peer")
        ... except Lost as lost:
        ...     lost.how
        "collective (DDP's construction): RuntimeError: Connection reset by peer"
        >>> try:
        ...     with recovering("reconcile"):
        ...         raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        ... except RuntimeError as e:
        ...     str(e)
        "DefaultCPUAllocator: can't allocate memory"
        >>> try:
        ...     with recovering("reconcile"):
        ...         raise RegroupError("the survivors diverged", reason="diverged")
        ... except RegroupError as e:
        ...     e.reason
        'diverged'
    """
    try:
        yield
    except RecoveryCollectiveError as e:  # it ended (with an error): nothing left pending
        raise Lost(f"collective ({what}): {e}", e) from None
    except PeerLostError as e:  # before RecoverkitError: both are TransportErrors
        raise Lost(f"heartbeat: {e}", e, abandoned=True) from None
    except PeerTimeoutError as e:
        raise Lost(f"collective: {e}", e, abandoned=True) from None
    except RecoverkitError:
        raise
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        if not backend:
            raise
        raise Lost(f"collective ({what}): {_describe(e)}", e) from None


class RecoveryCollectiveError(PeerLostError):
    """A collective of a recovery failed in the backend (a peer's reset, the group's
    timeout): what the recovery's own waits raise instead of the backend's ``RuntimeError``
    (:func:`lost_peer`), so that :func:`recovering` tells a lost peer from a local
    ``RuntimeError`` (an allocation) by type."""


def lost_peer(what: str, e: BaseException) -> RecoveryCollectiveError:
    """The backend's error ``e`` of the recovery's collective ``what``, as a
    :class:`RecoveryCollectiveError`."""
    return RecoveryCollectiveError(f"{what}: {_describe(e)}")
