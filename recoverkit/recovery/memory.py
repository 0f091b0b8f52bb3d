"""Restore from memory across ranks: own host or shared memory, a peer's copy, else the disk.

Where it sits: the first strategy of a restore whose tiers include a memory tier of a job
of several ranks: the shared-memory tier (``staging/shm_tier``; replicas from
``staging/replica``) and the host tier (``staging/host_tier``: this process's staged
snapshots); tier fallback (the disk) comes after it. Collective: every rank of the job calls
:meth:`MemoryRestore.recover` together. Where a rank reads copies without a transfer is a
*place* (``memory_held``): its node's shared memory, its own host memory.

One attempt, every exchange through the coordinator and bounded by its timeout::

    every rank   scan its places: (owner, own/replica, step, index CRC, sizes, world) per
                 place + the newest step on its disk tiers + the regions its sharded
                 targets hold (``wanted_regions``)                      ──gather "held"──►
    rank 0       the newest step S every owner rank of the world that saved it holds in
                 a live place, newer than (or as new as) every disk; for each owner the
                 copy to use (own snapshot first) and who sends rank 0 the indexes it lacks
                                                                ◄──broadcast "choice"──
    holders      indexes rank 0 lacks                                    ──gather "index"──►
    rank 0       manifest of S = build_manifest(every owner's records, meta) + validate;
                 what every rank needs of every owner; transfers from holding ranks to
                 ranks that read no copy, spread over the holders        ◄──broadcast "plan"──
    every rank   indexes (own places, else the plan), the same manifest, validated here
                 too (the one gate); local bytes mapped, remote ones fetched over the peer
                 transport (``distributed/fetch``) into one buffer per transfer sized from
                 the validated plan, each needed region's CRC checked as it lands (the only
                 pass: the sender computes none); the local regions and this rank's object
                 blob checked                                            ──gather "verified"──►
    rank 0       every rank verified? else the copies that failed   ◄──broadcast "verdict"──

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
import contextvars
import ctypes
import logging
import mmap
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..distributed.coordinator import Coordinator
from ..distributed.fetch import Transfer, run_transfers
from ..errors import CommitTimeoutError, IntegrityError
from ..format.checksum import crc32c
from ..format.manifest import Manifest, PackRecord
from ..format.shm_index import ShmIndex
from ..restore.reader import check_blob
from ..storage.base import ReadableTier
from ..storage.discovery import CheckpointSkippedWarning
from ..storage.shm import ShmStore
from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use
from .memory_held import HeldSource, HeldView, HostSource, ShmSource
from .memory_plan import (
    HOST_PLACE,
    MAX_OWNERS,
    Bad,
    Box,
    CopyKey,
    b64,
    bad_set,
    blob_owner,
    check_index,
    choose,
    manifest_of,
    needed_regions,
    newest_on,
    plan_fetches,
    span,
    unb64,
    wants_json,
    wants_of,
)  # fmt: skip
from .memory_source import MemoryTier, OwnerBytes
from .tier_fallback import TierSource

__all__ = ["MemoryRestore", "MemorySkippedWarning", "wanted_regions"]

log = logging.getLogger("recoverkit")

#: attempts of one restore (each excludes the copies the one before found damaged)
MAX_TRIES = 4
_GATHERS = ("held", "index", "verified")
_BROADCASTS = ("choice", "plan", "verdict")
_calls: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_WANTED: contextvars.ContextVar[dict[str, Box] | None] = contextvars.ContextVar("recoverkit_wanted", default=None)


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


# ---------------------------------------------------------------------- outcomes
class _CopyGone(Exception):
    """This node's copy of an owner vanished; ``bad`` names it for rank 0."""

    def __init__(self, message: str, bad: list[list[Any]]) -> None:
        super().__init__(message)
        self.bad = bad


@dataclass
class _Ready:
    tier: MemoryTier


@dataclass
class _Refused:
    reason: str
    warn: bool = False
    bad: set[Bad] = field(default_factory=set)


# ---------------------------------------------------------------------- one attempt
class _Attempt:
    """One round of the protocol (the module docstring) on this rank."""

    def __init__(
        self, strategy: MemoryRestore, scope: str, loss: Loss, disk: Sequence[ReadableTier],
        bad: set[Bad],
    ) -> None:
        self.strategy, self.scope, self.loss, self.disk, self.bad = strategy, scope, loss, disk, bad
        self.coord, self.rank, self.world = strategy.coordinator, strategy.rank, strategy.world_size
        self.timeout_s, self.sources = strategy.timeout_s, strategy.sources
        self.places = [src.place for src in self.sources]
        self._views: list[HeldView] = []  # copies this attempt opened
        self._owners: dict[int, OwnerBytes] = {}  # every owner's bytes as this rank holds them
        self._owned: set[int] = set()  # ids of the views the owners' bytes are
        self._regions: dict[int, dict[tuple[int, int], int]] = {}  # what this rank needs of each owner
        self._names: dict[tuple[int, int, int], str] = {}  # (owner, offset, nbytes) -> tensor, for messages
        self._landed_bad: list[int] = []  # owners whose fetched bytes failed their records
        self.owners = self.world  # the snapshot's ranks (rank 0's choice: its world may differ)
        self.wants = _WANTED.get()  # the regions this rank's sharded targets hold, if known
        self._all_wants: list[dict[str, Box] | None] = []  # rank 0: every rank's

    def run(self) -> _Ready | _Refused:
        ready: _Ready | _Refused
        try:
            ready = self._run()
        except CommitTimeoutError as e:
            ready = _Refused(f"not every rank answered in time ({e}): restoring from disk", warn=True)
        except BaseException:
            self._release(keep=False)
            raise
        self._release(keep=isinstance(ready, _Ready))
        return ready

    def _release(self, *, keep: bool) -> None:
        """Close what this attempt opened; with ``keep``, not what the tier reads from (it
        closes those itself)."""
        if not keep:
            for b in self._owners.values():
                b.close()
        for v in self._views:
            if not (keep and id(v) in self._owned):
                v.close()
        self._views = []

    def _exchange(
        self, name: str, mine: dict[str, Any], decide: Callable[[list[dict[str, Any]]], dict[str, Any]], out: str
    ) -> dict[str, Any]:
        """gather ``mine`` at rank 0 -> ``decide`` there -> broadcast its answer to every rank."""
        key = f"{self.scope}/{name}"
        answer: dict[str, Any] | None = None
        try:
            gathered = self.coord.gather(key, mine, timeout_s=self.timeout_s)
            if self.rank == 0 and gathered is not None:
                answer = decide(gathered)
        except CommitTimeoutError as e:  # rank 0: someone is late; every rank falls back
            answer = {"ok": False, "reason": f"not every rank answered in time ({e})", "warn": True}
        except (IntegrityError, ValueError, KeyError, TypeError, IndexError) as e:  # a report that does not parse
            answer = {"ok": False, "reason": f"a rank's report is malformed: {e}", "warn": True}
        return self.coord.broadcast(f"{self.scope}/{out}", answer, timeout_s=self.timeout_s)

    def _run(self) -> _Ready | _Refused:
        # 1. what every place holds, and the newest step on every disk
        held = {src.place: [c.to_json() for c in src.scan()] for src in self.sources}
        mine = {"node": self.places[-1], "places": self.places, "held": held, "disk": newest_on(self.disk),
                "wants": wants_json(self.wants)}  # fmt: skip
        choice = self._exchange("held", mine, self._choose, "choice")
        if not choice["ok"]:
            return _Refused(str(choice["reason"]), warn=bool(choice.get("warn")))
        step, nodes = int(choice["step"]), [[str(p) for p in ps] for ps in choice["places"]]
        owners = int(choice["owners"])
        if not 0 < owners <= MAX_OWNERS:
            raise IntegrityError(f"rank 0's choice names {owners} owner ranks")
        self.owners = owners
        crcs = {int(o): int(c) for o, c in choice["crcs"].items()}
        holders = {int(o): [(str(n), bool(r)) for n, r in hs] for o, hs in choice["holders"].items()}
        if len(nodes) != self.world or set(crcs) != set(range(owners)) or set(holders) != set(crcs):
            raise IntegrityError(f"rank 0's choice does not cover the world of {self.world} and {owners} owner(s)")
        if owners != self.world:
            log.info("recoverkit: rank %d restores step %d saved by %d rank(s) into a world of %d",
                     self.rank, step, owners, self.world)  # fmt: skip
        # 2. indexes rank 0 lacks, from a rank of a node holding them
        send: dict[str, str] = {}
        for o in (int(o) for o, r in choice["index_from"].items() if int(r) == self.rank and self.rank != 0):
            try:
                send[str(o)] = b64(self._open_here(o, step, crcs[o]).index_bytes)
            except (IntegrityError, OSError):  # gone meanwhile: rank 0 finds it missing
                pass
        plan = self._exchange("index", {"indexes": send}, lambda g: self._plan(g, step, nodes, crcs, holders), "plan")
        if not plan["ok"]:
            return _Refused(str(plan["reason"]), warn=bool(plan.get("warn")), bad=bad_set(plan.get("bad", ()), step))
        # 3. the same manifest here, validated; local bytes mapped, remote ones fetched, verified
        report, tier = self._fetch_and_verify(step, nodes, crcs, holders, plan)
        verdict = self._exchange("verified", report, self._judge, "verdict")
        if not verdict["ok"] or tier is None:
            if self.strategy.transport_built:
                self.strategy.drop_transport()  # a failed transfer may have broken it
            return _Refused(str(verdict["reason"]), warn=True, bad=bad_set(verdict.get("bad", ()), step))
        return _Ready(tier)

    # ------------------------------------------------------------------ rank 0's decisions
    def _choose(self, gathered: list[dict[str, Any]]) -> dict[str, Any]:
        self._all_wants = [wants_of(rep.get("wants")) for rep in gathered]
        return choose(gathered, world=self.world, bad=self.bad, step=self.loss.step)

    def _plan(
        self, gathered: list[dict[str, Any]], step: int, nodes: list[list[str]],
        crcs: Mapping[int, int], holders: Mapping[int, list[CopyKey]],
    ) -> dict[str, Any]:
        raw: dict[int, bytes] = {}
        for rep in gathered:
            for o, text in rep["indexes"].items():
                raw[int(o)] = unb64(text)
        indexes: dict[int, ShmIndex] = {}
        for o in range(self.owners):  # the copy read: rank 0's place's, or the one a holder sent
            here = [(n, r) for n, r in holders[o] if n in nodes[0]]
            node, replica = here[0] if o not in raw and here else holders[o][0]
            try:
                if o not in raw:
                    raw[o] = self._open_here(o, step, crcs[o]).index_bytes
                indexes[o] = check_index(raw[o], o, step, crcs[o], self.owners, f"rank {o}'s index from {_in(node)}")
            except (IntegrityError, OSError) as e:
                return {"ok": False, "reason": f"rank {o}'s snapshot of step {step} in {_in(node)}: {e}",
                        "warn": True, "bad": [[o, node, replica]]}
        try:
            manifest = manifest_of(step, indexes)
        except (IntegrityError, ValueError, KeyError) as e:  # the copies do not fit together: not this step
            return {"ok": False, "reason": f"step {step} in memory does not form a valid checkpoint: {e}",
                    "warn": True, "bad": [[o, n, r] for o in range(self.owners) for n, r in holders[o]]}
        # a snapshot restores its rank alone only into the world that saved it
        alone = {o for o, i in indexes.items() if i.self_contained} if self.owners == self.world else set()
        try:
            transfers = plan_fetches(manifest, nodes, holders, alone, wants=self._all_wants)
        except (ValueError, KeyError) as e:  # e.g. no rank can send an owner's bytes
            return {"ok": False, "reason": f"step {step} in memory cannot be gathered: {e}", "warn": True}
        lacking = {o for o in range(self.owners) for ps in nodes if not set(ps) & {h for h, _ in holders[o]}}
        return {"ok": True, "indexes": {str(o): b64(raw[o]) for o in sorted(lacking)},
                "transfers": [t.to_json() for t in transfers]}

    def _judge(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        failed = {r: rep for r, rep in enumerate(reports) if not rep["ok"]}
        if not failed:
            return {"ok": True}
        why = "; ".join(f"rank {r}: {rep['error']}" for r, rep in failed.items())
        bad = [b for rep in failed.values() for b in rep["bad"]]
        return {"ok": False, "reason": f"not every rank verified its memory snapshot ({why})", "bad": bad}

    # ------------------------------------------------------------------ every rank
    def _fetch_and_verify(
        self, step: int, nodes: list[list[str]], crcs: Mapping[int, int], holders: Mapping[int, list[CopyKey]],
        plan: dict[str, Any],
    ) -> tuple[dict[str, Any], MemoryTier | None]:
        """This rank's part of step 3: its report for rank 0, and the tier if it verified.

        A rank that fails before the transfers still runs them (what it cannot send or take
        is refused at once, on both ends), so no peer waits out the timeout for it."""
        try:  # the plan is the same on every rank: a fault here is every rank's
            transfers = [Transfer.from_json(t, world_size=self.world, owners=self.owners) for t in plan["transfers"]]
            transport = self.strategy.transport_for(self.timeout_s) if transfers else None
        except Exception as e:  # noqa: BLE001 - reported to rank 0: every rank falls back together
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "bad": []}, None
        used: dict[int, CopyKey] = {}  # owner -> the copy this rank's bytes come from
        failed: dict[str, Any] | None = None
        try:
            manifest, regions = self._prepare(step, nodes, crcs, holders, plan, transfers, used)
        except _CopyGone as e:
            failed = {"ok": False, "error": str(e), "bad": e.bad}
        except Exception as e:  # noqa: BLE001 - reported to rank 0: every rank falls back together
            failed = {"ok": False, "error": f"{type(e).__name__}: {e}", "bad": []}
        moved: dict[str, Any] | None = None  # what went wrong in the transfers
        if transport is not None:
            try:
                run_transfers(
                    transport, transfers, timeout_s=self.timeout_s,
                    source=lambda t: self._source(t, step, crcs[t.owner]),
                    sink=lambda t: self._sink(t, failed is None),
                    check=self._check_landed,
                )
            except Exception as e:  # noqa: BLE001 - reported to rank 0 (a refusal of our own included)
                bad = [[o, *used[o]] for o in dict.fromkeys(self._landed_bad) if o in used]
                moved = {"ok": False, "error": f"{type(e).__name__}: {e}", "bad": bad}
        if failed is not None:
            return failed, None
        # the local copies are checked even when a transfer failed (a damaged copy this rank
        # sent is named here: the receiver only knows it came through this rank)
        fetched = {t.owner for t in transfers if t.dst == self.rank}
        fault = _verify(manifest, self.rank, regions, self._owners, self._names,
                        skip=fetched if moved is not None else ())  # fmt: skip
        if fault is not None:
            owner, error = fault
            node, replica = used.get(owner, (self.places[0], False))
            where = self._owners[owner].where if owner in self._owners else "not gathered"
            log.warning("recoverkit: rank %d: rank %d's snapshot of step %d from %s is damaged: %s",
                        self.rank, owner, step, where, error)
            text, bad = f"rank {owner}'s snapshot from {where}: {error}", [[owner, node, replica]]
            if moved is not None:
                text, bad = f"{text}; {moved['error']}", bad + moved["bad"]
            return {"ok": False, "error": text, "bad": bad}, None
        if moved is not None:
            return moved, None
        return {"ok": True}, MemoryTier(manifest, self._owners)

    def _prepare(
        self, step: int, nodes: list[list[str]], crcs: Mapping[int, int], holders: Mapping[int, list[CopyKey]],
        plan: dict[str, Any], transfers: list[Transfer], used: dict[int, CopyKey],
    ) -> tuple[Manifest, dict[int, dict[tuple[int, int], int]]]:
        """Every owner's index (a copy in this rank's places, else the one rank 0 shipped) ->
        the manifest through the one gate -> this rank's regions; local copies mapped, one
        buffer per transfer to this rank, sized from the validated plan (the span of the
        regions it needs of that owner, checked against the manifest here)."""
        shipped = {int(o): unb64(t) for o, t in plan["indexes"].items()}
        mine_at = set(self.places)
        local = {o for o in range(self.owners) if mine_at & {n for n, _ in holders[o]}}
        indexes: dict[int, ShmIndex] = {}
        for o in range(self.owners):
            if o in local:
                try:
                    v = self._open_here(o, step, crcs[o])
                except (IntegrityError, OSError) as e:  # gone meanwhile: this place's copy is out
                    raise _CopyGone(str(e), [[o, n, r] for n, r in holders[o] if n in mine_at]) from e
                indexes[o] = check_index(v.index_bytes, o, step, crcs[o], self.owners, v.path)
                kind = "replica" if v.replica else ("own host memory" if v.place.startswith(HOST_PLACE) else "own shm")
                where = kind if kind == "own host memory" else f"{kind} on node {v.place}"
                self._owners[o] = v.owner_bytes(where)
                self._owned.add(id(v))
                used[o] = (v.place, v.replica)
            else:
                indexes[o] = check_index(shipped[o], o, step, crcs[o], self.owners, f"rank {o}'s index (via rank 0)")
        manifest = manifest_of(step, indexes)  # the one gate, on this rank too
        alone = self.owners == self.world and indexes[self.rank].self_contained
        regions = self._regions = needed_regions(manifest, self.rank, alone=alone, wants=self.wants)
        self._names = _region_names(manifest, regions)
        mine = sorted((t.owner, t.offset, t.nbytes) for t in transfers if t.dst == self.rank)
        want = sorted((o, *span(rs)) for o, rs in regions.items() if o not in local)
        if mine != want:
            raise IntegrityError(f"rank 0's plan sends this rank {mine}, it needs {want}")
        for t in transfers:
            if t.dst == self.rank:  # t.nbytes: the span just checked against the manifest
                buf = mmap.mmap(-1, max(t.nbytes, 1), flags=_PRIVATE)
                view = memoryview(buf)[: t.nbytes]
                held = next(((n, r) for n, r in holders[t.owner] if n in nodes[t.src]), (nodes[t.src][0], True))
                where = f"{_in(held[0])} via rank {t.src}"
                self._owners[t.owner] = OwnerBytes(
                    view, _mmap_address(buf), where, close=_closer(view, buf), base=t.offset, stable=True
                )
                used[t.owner] = held
        return manifest, regions

    def _check_landed(self, t: Transfer, landed: memoryview) -> None:
        """The one pass over fetched bytes: every region this rank needs of ``t.owner``,
        against the manifest's CRC, as the transfer lands (IntegrityError naming the tensor)."""
        from ..restore.in_place import Unit, verify  # here: see _verify

        owner = self._owners.get(t.owner)
        rs = self._regions.get(t.owner)
        if owner is None or rs is None or landed.nbytes != t.nbytes:
            raise IntegrityError(f"rank {self.rank}: no buffer for rank {t.owner}'s bytes from rank {t.src}")
        units = []
        for (offset, nbytes), crc in sorted(rs.items()):
            at = offset - t.offset
            if at < 0 or at + nbytes > t.nbytes:
                raise IntegrityError(f"rank {t.owner}'s bytes [{offset}, +{nbytes}) lie outside the transfer")
            units.append(Unit(landed[at : at + nbytes], crc, _what(self._names, t.owner, offset, nbytes)))
        try:
            verify(units)
        except IntegrityError as e:
            self._landed_bad.append(t.owner)
            raise IntegrityError(f"rank {self.rank}: rank {t.owner}'s snapshot from {owner.where}: {e}") from None
        owner.verified.update(rs)

    def _source(self, t: Transfer, step: int, crc: int) -> Any:
        """What this rank sends for ``t``: its node's copy's bytes, or nothing when it lost
        them (the receiver refuses 0 bytes at once)."""
        try:
            return self._open_here(t.owner, step, crc).memory_view(t.offset, t.nbytes)
        except (IntegrityError, OSError, ValueError):
            return b""

    def _sink(self, t: Transfer, ready: bool) -> Any:
        """Where ``t`` lands: the buffer sized for it, or a 0-byte one this rank refuses with
        when it failed before (both ends learn at once, nobody waits)."""
        got = self._owners.get(t.owner) if ready else None
        if got is None or got.base != t.offset or got.data.nbytes != t.nbytes:
            return bytearray()
        return got.data

    def _open_here(self, owner: int, step: int, crc: int) -> HeldView:
        """A copy of ``owner``'s ``step`` in this rank's places whose index has CRC ``crc``
        (the fastest place first, own snapshot before a replica)."""
        for v in self._views:
            if not v.closed and v.index.rank == owner and v.index.step == step and crc32c(v.index_bytes) == crc:
                return v
        for src in self.sources:
            try:
                v = src.open(owner, step, crc)
            except (IntegrityError, OSError):
                continue
            self._views.append(v)
            return v
        where = " or ".join(map(_in, self.places))
        raise IntegrityError(f"{where} no longer holds rank {owner}'s snapshot of step {step}")


# ---------------------------------------------------------------------- helpers
def _verify(
    manifest: Manifest, rank: int, regions: Mapping[int, Mapping[tuple[int, int], int]], owners: Mapping[int, OwnerBytes],
    names: Mapping[tuple[int, int, int], str], *, skip: Collection[int] = (),
) -> tuple[int, str] | None:
    """Check every needed region's CRC not verified yet (those that landed were checked as
    they did), then this rank's object blob; (owner, fault) of the first owner that fails,
    or None. Verified regions are recorded on their owner's bytes. ``skip``: owners not
    checked (their transfer failed), nor the blob when it is one of theirs."""
    # imported here: importing restore.in_place (which imports the module state.flatten)
    # before staging.plan's ``from ..state import flatten`` makes that name the module
    from ..restore.in_place import Unit, verify

    for o, rs in sorted(regions.items()):
        if o in skip:
            continue
        held = owners[o]
        units = []
        for (offset, nbytes), crc in sorted(rs.items()):
            if (offset, nbytes) in held.verified:
                continue
            found = held.locate(offset, nbytes)
            if found is None:
                return o, f"bytes [{offset}, {offset + nbytes}) lie outside what this rank holds of it"
            units.append(Unit(found[0], crc, _what(names, o, offset, nbytes)))
        try:
            verify(units)
        except IntegrityError as e:
            return o, str(e)
        held.verified.update(rs)
    b = manifest.blob_for(blob_owner(manifest, rank))
    if b.rank in skip:
        return None
    try:
        found = owners[b.rank].locate(b.offset, b.nbytes)
        if found is None:
            raise IntegrityError(f"rank {b.rank}'s object blob lies outside what this rank holds of it")
        check_blob(manifest, b.rank, bytes(found[0]))
    except IntegrityError as e:
        return b.rank, str(e)
    return None


def _region_names(
    manifest: Manifest, regions: Mapping[int, Mapping[tuple[int, int], int]]
) -> dict[tuple[int, int, int], str]:
    """(owner, offset, nbytes) -> the tensor (or object blob) each needed region holds."""
    out: dict[tuple[int, int, int], str] = {}
    for key, rec in manifest.tensors.items():
        for s in rec.shards:
            region = s.pack if s.pack is not None else s
            if (region.offset, region.nbytes) in regions.get(region.rank, {}):
                what = f"a pack holding {key!r}" if isinstance(region, PackRecord) else repr(key)
                out.setdefault((region.rank, region.offset, region.nbytes), what)
    for b in manifest.blobs:
        out.setdefault((b.rank, b.offset, b.nbytes), f"rank {b.rank}'s object blob")
    return out


def _what(names: Mapping[tuple[int, int, int], str], owner: int, offset: int, nbytes: int) -> str:
    name = names.get((owner, offset, nbytes), "a region")
    return f"{name} at {offset} ({nbytes} bytes)"


def _in(place: str) -> str:
    """A place for messages: ``node a``, ``the host memory of rank 1``."""
    if place.startswith(HOST_PLACE):
        return f"the host memory of rank {int(place.rsplit('-', 1)[-1])}"
    return f"node {place}"


_PRIVATE = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_POPULATE", 0)


def _mmap_address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _closer(view: memoryview, buf: mmap.mmap) -> Callable[[], None]:
    def close() -> None:
        try:
            view.release()
            buf.close()
        except BufferError:  # a view handed out is still alive: unmapped when it is collected
            pass

    return close


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
