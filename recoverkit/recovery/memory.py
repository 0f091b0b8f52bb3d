"""Restore from memory across ranks: own host or shared memory, a peer's copy, else the disk.

Where it sits: the first strategy of a restore whose tiers include a memory tier of a job
of several ranks: the shared-memory tier (``staging/shm_tier``; replicas from
``staging/replica``) and the host tier (``staging/host_tier``: this process's staged
snapshots); tier fallback (the disk) comes after it. Collective: every rank of the job calls
:meth:`MemoryRestore.recover` together. Where a rank reads copies without a transfer is a
*place* (``memory_held``): its node's shared memory, its own host memory.

The flow of a restore::

    recover        up to MAX_TRIES attempts (``memory_attempt._Attempt``, one coordinator
                   scope each): every rank scans its places -> rank 0 chooses the newest
                   step held whole -> indexes -> one manifest, validated, and the transfers
                   -> every rank fetches and verifies -> rank 0's verdict; a copy found
                   damaged is excluded and the next attempt tries another
    use            the verified MemoryTier, read as a TierSource
    applied?       every rank reports whether it applied the step (one more exchange): all
                   from memory, or every rank falls back to the disk

The exchanges of one attempt, step by step, are in ``recovery.memory_attempt``.

Only after the verdict does any rank ``use`` the source (a
:class:`~recoverkit.recovery.memory_source.MemoryTier` in a
:class:`~recoverkit.recovery.tier_fallback.TierSource`). A copy found damaged is excluded
and the attempt repeats (the next holder, else an older step); a rank that does not answer,
a disk newer than memory, or a step no live node holds completely ends in
:class:`~recoverkit.recovery.base.CannotRecover` on every rank alike, with a warning naming
what was skipped when memory held something newer than the disk.

**A world of another size** (issue 13: a shrink after a lost node, a grow back): the
*owners* are the snapshot's ranks ``0..W_old-1`` (the world size its indexes record; copies
of different worlds never mix in one step), the *receivers* the restoring world's ranks.
Each receiver gathers what the reader's resharding rules read (``memory_plan.needed_regions``):
replicated tensors from their owner; of a sharded tensor (ShardedTensor, DTensor) the
saved pieces overlapping its target's region, or every piece when the target's region is
not known; its own object blob and rank-local tensors (``rank-RRRRR/``), or rank 0's when
the snapshot's world had no such rank (the world grew: the reader's rule for a disk, with
its warning; after a shrink, the rank-local state of the old ranks beyond the new world is
read by no rank, as from a disk). A
snapshot that says it restores its rank alone (``self_contained``) does so only in the
world that saved it. The transfers are planned over every holder of a copy, verified, agreed
and only then applied, exactly as without a change.

In a data-parallel job (every rank alive, each with its own snapshot) this restores from
memory although a rank's snapshot is not self-contained: the replicated tensors written by
their owner rank come from that owner's snapshot (its node's shared memory, or the transport;
a host snapshot only ever through the transport, from its own process).

Bytes that nothing can change until the restore ends (fetched buffers, this process's host
snapshot) are verified once: the :class:`~recoverkit.recovery.memory_source.MemoryTier` says so
(``views_verified``) and the in-place restore copies them without a second CRC pass.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from ..distributed.coordinator import Coordinator
from ..errors import CommitTimeoutError, IntegrityError
from ..storage.discovery import CheckpointSkippedWarning
from ..storage.shm import ShmStore
from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use
from .memory_attempt import _WANTED, _Attempt, _Ready, _Refused
from .memory_held import HeldSource, HostSource, ShmSource
from .memory_plan import Bad, Box
from .tier_fallback import TierSource

__all__ = ["MemoryRestore", "MemorySkippedWarning", "wanted_regions"]

log = logging.getLogger("recoverkit")

#: attempts of one restore (each excludes the copies the one before found damaged)
MAX_TRIES = 4
_GATHERS = ("held", "index", "verified")
_BROADCASTS = ("choice", "plan", "verdict")
_calls: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def wanted_regions(boxes: Mapping[str, Box] | None) -> Iterator[None]:
    """Inside it, a memory restore gathers of each sharded tensor named in ``boxes`` (tensor
    key -> ``(offsets, shape)`` of the region this rank's target holds: its ShardedTensor
    or DTensor shard) only the saved pieces that overlap that region, as the reader reads
    them; every rank reports its own to rank 0, which plans the transfers from them. A
    sharded tensor not named comes whole (every piece). The reader sets it around its
    recovery chain.

    Example:
        >>> with wanted_regions({"w": ((4, 0), (4, 8))}):
        ...     _WANTED.get()
        {'w': ((4, 0), (4, 8))}
    """
    token = _WANTED.set(None if boxes is None else dict(boxes))
    try:
        yield
    finally:
        _WANTED.reset(token)


class MemorySkippedWarning(CheckpointSkippedWarning):
    """Memory held a snapshot newer than the disk that could not be used (named), or a copy
    in memory failed its verification: the restore used another copy or the disk."""


class MemoryHolder(Protocol):
    """What the strategy needs of the shared-memory tier (``staging.shm_tier.ShmTier``)."""

    store: ShmStore
    coordinator: Coordinator
    rank: int
    world_size: int
    timeout_s: float


class MemoryRestore(RecoveryStrategy):
    """The newest step complete across every rank in memory anywhere (see the module doc).

    Args:
        shm: the shared-memory tier of this rank (its store, coordinator, rank, world size
            and timeout are used), or None.
        host: the host tier of this rank (``staging.host_tier.HostTier``: its snapshots are
            a place only this rank reads; its coordinator, else the process's default one,
            and its timeout are used without ``shm``), or None.
        replica: the peer-replica tier, if any: its store is searched too when its shared
            memory is not the shm tier's (its own transport stays its replicator's).
        transport: moves bytes between nodes (default: ``survivors.transport``, else one
            built together on every rank when a plan needs it).
        make_transport: builds that transport (every rank calls it at the same point;
            default: a :class:`~recoverkit.distributed.transport.ProcessGroupTransport`).

    Example (every rank of the job)::

        chain = RecoveryChain([MemoryRestore(ckpt.tiers["shm"]), TierFallback()])
        chain.run(Loss(), Survivors(tiers=disk_tiers), use)
    """

    name = "memory restore"

    def __init__(
        self,
        shm: MemoryHolder | None = None,
        *,
        replica: Any = None,
        host: Any = None,
        transport: Any = None,
        make_transport: Callable[[float], Any] | None = None,
    ) -> None:
        if shm is None and host is None:
            raise ValueError("a memory restore needs a shared-memory tier or a host tier")
        self.shm = shm
        self.sources: list[HeldSource] = [HostSource(host)] if host is not None else []  # fastest first
        self.stores: list[ShmStore] = []
        if shm is not None:
            self.stores = [shm.store]
            other = getattr(replica, "store", None)
            if isinstance(other, ShmStore) and other.job_dir != shm.store.job_dir:
                self.stores.append(other)
            self.sources.append(ShmSource(self.stores))
        first: Any = shm if shm is not None else host
        self.rank, self.world_size, self.timeout_s = int(first.rank), int(first.world_size), float(first.timeout_s)
        self._coordinator: Coordinator | None = first.coordinator
        self.transport = transport
        self._make_transport = make_transport or _process_group_transport
        self._transport: Any = None
        self._built = False

    # ------------------------------------------------------------------ the strategy
    @property
    def coordinator(self) -> Coordinator:
        """The coordinator of the exchanges (a host tier without one: the process's default
        one, built on first use: every rank restores together, so every rank builds it at
        the same point)."""
        if self._coordinator is None:
            self._coordinator = _default_coordinator(self.timeout_s)
        return self._coordinator

    def recover(self, loss: Loss, survivors: Survivors, use: Use[T]) -> Recovered[T] | CannotRecover:
        if not any(s.takes_part for s in self.sources):  # the same on every rank: no exchange
            return CannotRecover(self.name, "no rank holds a snapshot in memory (none was staged in this process)")
        coord = self.coordinator
        disk = [t for t in survivors.tiers if t.name not in loss.tiers]
        given = self.transport or survivors.transport
        self._transport, self._built = given, False
        bad: set[Bad] = set()  # (owner, step, node, replica) found damaged
        outcome: _Ready | _Refused = _Refused("no attempt")
        try:
            for _ in range(MAX_TRIES):
                n = _calls.get(coord, 0)
                _calls[coord] = n + 1
                scope = f"memory-restore/{n}"
                try:
                    outcome = _Attempt(self, scope, loss, disk, bad).run()
                finally:
                    coord.finish(scope, gathers=_GATHERS, broadcasts=_BROADCASTS)
                if isinstance(outcome, _Ready) or not outcome.bad - bad:
                    break
                warnings.warn(f"memory restore: {outcome.reason}: skipping that copy, trying another",
                              MemorySkippedWarning, stacklevel=4)  # fmt: skip
                bad |= outcome.bad
        finally:
            self.drop_transport()
        if isinstance(outcome, _Refused):
            if outcome.warn:
                warnings.warn(f"memory restore: {outcome.reason}", MemorySkippedWarning, stacklevel=4)
            return CannotRecover(self.name, outcome.reason)
        tier = outcome.tier
        log.info(
            "recoverkit: rank %d restores step %d from memory: %s", self.rank, tier.step,
            "; ".join(f"rank {o}'s snapshot from {b.where}" for o, b in sorted(tier.owners.items())),
        )
        value: Any = None
        error: BaseException | None = None
        try:
            source = TierSource(tier, tier.step, tier.manifest(tier.step))
            value = use(source)
        except BaseException as e:  # noqa: BLE001 - every rank learns of it below, then it goes on
            error = e
        finally:
            tier.close()
        failed = self._applied_everywhere(tier.step, error)  # collective: all or none from memory
        if error is not None and not isinstance(error, (IntegrityError, OSError)):
            raise error  # not damage: the caller's request does not fit (or an interrupt)
        if failed is not None:  # damaged after the verdict (a writer?): the disk, on every rank
            warnings.warn(f"memory restore of step {tier.step}: {failed}", MemorySkippedWarning, stacklevel=4)
            return CannotRecover(self.name, f"step {tier.step} from memory failed: {failed}", error)
        return Recovered(self.name, source, value)

    def _applied_everywhere(self, step: int, error: BaseException | None) -> str | None:
        """Every rank: whether every rank applied ``step`` from memory (None) or which did
        not (so every rank falls back, and the disk overwrites what the others applied)."""
        coord = self.coordinator
        n = _calls.get(coord, 0)
        _calls[coord] = n + 1
        scope = f"memory-restore/{n}"
        mine = {"ok": error is None, "error": "" if error is None else f"{type(error).__name__}: {error}"}
        try:
            answer: dict[str, Any] | None = None
            try:
                reports = coord.gather(f"{scope}/applied", mine, timeout_s=self.timeout_s)
                if coord.rank == 0 and reports is not None:
                    bad = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if not rep["ok"]]
                    answer = {"failed": "; ".join(bad)}
            except CommitTimeoutError as e:
                answer = {"failed": f"not every rank answered in time ({e})"}
            verdict = coord.broadcast(f"{scope}/done", answer, timeout_s=self.timeout_s)
        except CommitTimeoutError as e:
            return f"no word from rank 0 in time ({e})"
        finally:
            coord.finish(scope, gathers=("applied",), broadcasts=("done",))
        return str(verdict["failed"]) or None

    def transport_for(self, timeout_s: float) -> Any:
        """The transport of this restore: the one given, else one built now (every rank calls
        this at the same point of the protocol: building one is collective)."""
        if self._transport is None:
            self._transport, self._built = self._make_transport(timeout_s), True
        return self._transport

    @property
    def transport_built(self) -> bool:
        return self._built

    def drop_transport(self) -> None:
        """Close the transport this restore built (a given one stays the giver's)."""
        if self._built and self._transport is not None:
            try:
                self._transport.close()
            except Exception:  # noqa: BLE001 - a broken transport: nothing left to release
                pass
            self._transport, self._built = None, False


_default: list[Coordinator] = []  # the process's default coordinator, built once


def _default_coordinator(timeout_s: float) -> Coordinator:
    """The process's default coordinator (collective the first time: every rank builds it
    at the same point of a restore)."""
    if not _default:
        from ..distributed.coordinator import default_coordinator

        _default.append(default_coordinator(timeout_s=timeout_s))
    return _default[0]


def _process_group_transport(timeout_s: float) -> Any:
    """A transport on a new group with the job's own backend (a gloo job on a machine with a
    GPU stays on gloo; an NCCL job stages host bytes through its device)."""
    import torch.distributed as dist

    from ..distributed.transport import ProcessGroupTransport

    backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None
    return ProcessGroupTransport(timeout_s=timeout_s, backend=backend)
