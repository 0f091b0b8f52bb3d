"""Restore from memory across ranks: own shared memory, a peer's replica, else the disk.

Where it sits: the first strategy of a restore whose tiers include a shared-memory tier
(``staging/shm_tier``; replicas from ``staging/replica``); tier fallback (the disk) comes
after it. Collective: every rank of the job calls :meth:`MemoryRestore.recover` together.

One attempt, every exchange through the coordinator and bounded by its timeout::

    every rank   scan its node's shm job dir: (owner, own/replica, step, index CRC, sizes)
                 + the newest step on its disk tiers                     ──gather "held"──►
    rank 0       the newest step S every owner rank of the world holds on a live node,
                 newer than (or as new as) every disk; for each owner the copy to use
                 (own snapshot first) and who sends rank 0 the indexes it lacks
                                                                ◄──broadcast "choice"──
    holders      indexes rank 0 lacks                                    ──gather "index"──►
    rank 0       manifest of S = build_manifest(every owner's records, meta) + validate;
                 what every rank needs of every owner; transfers from holder nodes to
                 ranks whose node has no copy, spread over the holders   ◄──broadcast "plan"──
    every rank   indexes (own node's shm, else the plan), the same manifest, validated
                 here too (the one gate); local bytes mapped, remote ones fetched over the
                 peer transport (``distributed/fetch``); every needed region's CRC and
                 this rank's object blob checked                         ──gather "verified"──►
    rank 0       every rank verified? else the copies that failed   ◄──broadcast "verdict"──

Only after the verdict does any rank ``use`` the source (a
:class:`~recoverkit.recovery.memory_source.MemoryTier` in a
:class:`~recoverkit.recovery.tier_fallback.TierSource`). A copy found damaged is excluded
and the attempt repeats (the next holder, else an older step); a rank that does not answer,
a disk newer than memory, or a step no live node holds completely ends in
:class:`~recoverkit.recovery.base.CannotRecover` on every rank alike, with a warning naming
what was skipped when memory held something newer than the disk.

In a data-parallel job (every rank alive, each with its own snapshot) this restores from
memory although a rank's snapshot is not self-contained: the replicated tensors written by
their owner rank come from that owner's snapshot (its node's shared memory, or the transport).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..distributed.coordinator import Coordinator
from ..distributed.fetch import Transfer, run_transfers
from ..errors import CommitTimeoutError, IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.manifest import Manifest
from ..format.shm_index import ShmIndex
from ..restore.reader import check_blob
from ..storage.base import ReadableTier
from ..storage.discovery import CheckpointSkippedWarning
from ..storage.shm import ShmStore
from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use
from .memory_plan import (
    Bad,
    CopyKey,
    b64,
    bad_set,
    check_index,
    choose,
    manifest_of,
    needed_regions,
    newest_on,
    plan_fetches,
    scan,
    span,
    unb64,
)  # fmt: skip
from .memory_source import MemoryTier, OwnerBytes
from .tier_fallback import TierSource

__all__ = ["MemoryRestore", "MemorySkippedWarning"]

log = logging.getLogger("recoverkit")

#: attempts of one restore (each excludes the copies the one before found damaged)
MAX_TRIES = 4
_GATHERS = ("held", "index", "verified")
_BROADCASTS = ("choice", "plan", "verdict")
_calls: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


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
            and timeout are used).
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
        shm: MemoryHolder,
        *,
        replica: Any = None,
        transport: Any = None,
        make_transport: Callable[[float], Any] | None = None,
    ) -> None:
        self.shm = shm
        self.stores = [shm.store]
        other = getattr(replica, "store", None)
        if isinstance(other, ShmStore) and other.job_dir != shm.store.job_dir:
            self.stores.append(other)
        self.transport = transport
        self._make_transport = make_transport or _process_group_transport
        self._transport: Any = None
        self._built = False

    # ------------------------------------------------------------------ the strategy
    def recover(self, loss: Loss, survivors: Survivors, use: Use[T]) -> Recovered[T] | CannotRecover:
        coord = self.shm.coordinator
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
                warnings.warn(f"memory restore: {outcome.reason}: trying another copy", MemorySkippedWarning, stacklevel=4)
                bad |= outcome.bad
        finally:
            self.drop_transport()
        if isinstance(outcome, _Refused):
            if outcome.warn:
                warnings.warn(f"memory restore: {outcome.reason}", MemorySkippedWarning, stacklevel=4)
            return CannotRecover(self.name, outcome.reason)
        tier = outcome.tier
        log.info(
            "recoverkit: rank %d restores step %d from memory: %s", self.shm.rank, tier.step,
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
        coord = self.shm.coordinator
        n = _calls.get(coord, 0)
        _calls[coord] = n + 1
        scope = f"memory-restore/{n}"
        mine = {"ok": error is None, "error": "" if error is None else f"{type(error).__name__}: {error}"}
        try:
            answer: dict[str, Any] | None = None
            try:
                reports = coord.gather(f"{scope}/applied", mine, timeout_s=self.shm.timeout_s)
                if coord.rank == 0 and reports is not None:
                    bad = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if not rep["ok"]]
                    answer = {"failed": "; ".join(bad)}
            except CommitTimeoutError as e:
                answer = {"failed": f"not every rank answered in time ({e})"}
            verdict = coord.broadcast(f"{scope}/done", answer, timeout_s=self.shm.timeout_s)
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
        shm = strategy.shm
        self.strategy, self.scope, self.loss, self.disk, self.bad = strategy, scope, loss, disk, bad
        self.coord, self.stores, self.rank, self.world = shm.coordinator, strategy.stores, shm.rank, shm.world_size
        self.timeout_s, self.node = shm.timeout_s, shm.store.node
        self._views: list[Any] = []  # slot views this attempt opened
        self._owners: dict[int, OwnerBytes] = {}  # every owner's bytes as this rank holds them
        self._owned: set[int] = set()  # ids of the views the owners' bytes are

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
        # 1. what every node holds, and the newest step on every disk
        mine = {"node": self.node, "held": [c.to_json() for c in scan(self.stores)], "disk": newest_on(self.disk)}
        choice = self._exchange("held", mine, lambda g: choose(g, world=self.world, bad=self.bad, step=self.loss.step), "choice")
        if not choice["ok"]:
            return _Refused(str(choice["reason"]), warn=bool(choice.get("warn")))
        step, nodes = int(choice["step"]), [str(n) for n in choice["nodes"]]
        crcs = {int(o): int(c) for o, c in choice["crcs"].items()}
        holders = {int(o): [(str(n), bool(r)) for n, r in hs] for o, hs in choice["holders"].items()}
        if len(nodes) != self.world or set(crcs) != set(range(self.world)) or set(holders) != set(crcs):
            raise IntegrityError(f"rank 0's choice does not cover the world of {self.world}")
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
    def _plan(
        self, gathered: list[dict[str, Any]], step: int, nodes: list[str],
        crcs: Mapping[int, int], holders: Mapping[int, list[CopyKey]],
    ) -> dict[str, Any]:
        raw: dict[int, bytes] = {}
        for rep in gathered:
            for o, text in rep["indexes"].items():
                raw[int(o)] = unb64(text)
        indexes: dict[int, ShmIndex] = {}
        for o in range(self.world):  # the copy read: rank 0's node's, or the one a holder sent
            here = [(n, r) for n, r in holders[o] if n == nodes[0]]
            node, replica = here[0] if o not in raw and here else holders[o][0]
            try:
                if o not in raw:
                    raw[o] = self._open_here(o, step, crcs[o]).index_bytes
                indexes[o] = check_index(raw[o], o, step, crcs[o], self.world, f"rank {o}'s index from node {node}")
            except (IntegrityError, OSError) as e:
                return {"ok": False, "reason": f"rank {o}'s snapshot of step {step} on node {node}: {e}",
                        "warn": True, "bad": [[o, node, replica]]}
        try:
            manifest = manifest_of(step, indexes)
        except (IntegrityError, ValueError, KeyError) as e:  # the copies do not fit together: not this step
            return {"ok": False, "reason": f"step {step} in memory does not form a valid checkpoint: {e}",
                    "warn": True, "bad": [[o, n, r] for o in range(self.world) for n, r in holders[o]]}
        transfers = plan_fetches(manifest, nodes, holders)
        lacking = {o for o in range(self.world) for n in nodes if n not in {h for h, _ in holders[o]}}
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
        self, step: int, nodes: list[str], crcs: Mapping[int, int], holders: Mapping[int, list[CopyKey]],
        plan: dict[str, Any],
    ) -> tuple[dict[str, Any], MemoryTier | None]:
        """This rank's part of step 3: its report for rank 0, and the tier if it verified.

        A rank that fails before the transfers still runs them (what it cannot send or take
        is refused at once, on both ends), so no peer waits out the timeout for it."""
        try:  # the plan is the same on every rank: a fault here is every rank's
            transfers = [Transfer.from_json(t, world_size=self.world) for t in plan["transfers"]]
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
        if transport is not None:
            try:
                run_transfers(
                    transport, transfers, timeout_s=self.timeout_s,
                    source=lambda t: self._source(t, step, crcs[t.owner]),
                    sink=lambda t: self._sink(t, failed is None),
                )
            except Exception as e:  # noqa: BLE001 - reported to rank 0 (a refusal of our own included)
                failed = failed or {"ok": False, "error": f"{type(e).__name__}: {e}", "bad": []}
        if failed is not None:
            return failed, None
        fault = _verify(manifest, self.rank, regions, self._owners)
        if fault is not None:
            owner, error = fault
            node, replica = used.get(owner, (self.node, False))
            where = self._owners[owner].where if owner in self._owners else "not gathered"
            log.warning("recoverkit: rank %d: rank %d's snapshot of step %d from %s is damaged: %s",
                        self.rank, owner, step, where, error)
            return {"ok": False, "error": f"rank {owner}'s snapshot from {where}: {error}",
                    "bad": [[owner, node, replica]]}, None
        return {"ok": True}, MemoryTier(manifest, self._owners)

    def _prepare(
        self, step: int, nodes: list[str], crcs: Mapping[int, int], holders: Mapping[int, list[CopyKey]],
        plan: dict[str, Any], transfers: list[Transfer], used: dict[int, CopyKey],
    ) -> tuple[Manifest, dict[int, dict[tuple[int, int], int]]]:
        """Every owner's index (this node's copy, else the one rank 0 shipped) -> the manifest
        through the one gate -> this rank's regions; this node's copies mapped, a buffer sized
        from the validated index for each owner to fetch."""
        shipped = {int(o): unb64(t) for o, t in plan["indexes"].items()}
        local = {o for o in range(self.world) if self.node in {n for n, _ in holders[o]}}
        indexes: dict[int, ShmIndex] = {}
        for o in range(self.world):
            if o in local:
                try:
                    v = self._open_here(o, step, crcs[o])
                except (IntegrityError, OSError) as e:  # gone meanwhile: this node's copy is out
                    raise _CopyGone(str(e), [[o, self.node, r] for n, r in holders[o] if n == self.node]) from e
                indexes[o] = check_index(v.index_bytes, o, step, crcs[o], self.world, v.path)
                kind = "replica" if v.slots.replica else "own shm"
                self._owners[o] = OwnerBytes(v.data, v.address, f"{kind} on node {self.node}", close=v.close)
                self._owned.add(id(v))
                used[o] = (self.node, bool(v.slots.replica))
            else:
                indexes[o] = check_index(shipped[o], o, step, crcs[o], self.world, f"rank {o}'s index (via rank 0)")
        manifest = manifest_of(step, indexes)  # the one gate, on this rank too
        regions = needed_regions(manifest, self.rank)
        mine = sorted((t.owner, t.offset, t.nbytes) for t in transfers if t.dst == self.rank)
        want = sorted((o, *span(rs)) for o, rs in regions.items() if o not in local)
        if mine != want:
            raise IntegrityError(f"rank 0's plan sends this rank {mine}, it needs {want}")
        for t in transfers:
            if t.dst == self.rank:
                size = indexes[t.owner].data_bytes  # validated: every record lies inside it
                buf = mmap.mmap(-1, max(size, 1))  # pages are given only as the bytes land
                view = memoryview(buf)[:size]
                where = f"node {nodes[t.src]} via rank {t.src}"
                self._owners[t.owner] = OwnerBytes(view, _mmap_address(buf), where, close=_closer(view, buf))
                used[t.owner] = next(((n, r) for n, r in holders[t.owner] if n == nodes[t.src]), (nodes[t.src], True))
        return manifest, regions

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
        return got.data[t.offset : t.offset + t.nbytes] if got is not None else bytearray()

    def _open_here(self, owner: int, step: int, crc: int) -> Any:
        """This node's copy of ``owner``'s ``step`` whose index has CRC ``crc`` (own slot first)."""
        for v in self._views:
            if v.index.rank == owner and v.step == step and crc32c(v.index_bytes) == crc:
                return v
        for store, replica in ((st, r) for r in (False, True) for st in self.stores):
            try:
                v = store.slots(owner, replica=replica).open(step)
            except (IntegrityError, OSError):
                continue
            if crc32c(v.index_bytes) == crc:
                self._views.append(v)
                return v
            v.close()
        raise IntegrityError(f"node {self.node} no longer holds rank {owner}'s snapshot of step {step}")


# ---------------------------------------------------------------------- helpers
def _verify(
    manifest: Manifest, rank: int, regions: Mapping[int, Mapping[tuple[int, int], int]], owners: Mapping[int, OwnerBytes]
) -> tuple[int, str] | None:
    """Check every needed region's CRC, then this rank's object blob; (owner, fault) of the
    first that fails, or None. Verified regions are recorded on their owner's bytes."""
    for o, rs in sorted(regions.items()):
        data = owners[o].data
        for (offset, nbytes), crc in sorted(rs.items()):
            if offset + nbytes > data.nbytes:
                return o, f"bytes [{offset}, {offset + nbytes}) lie outside its {data.nbytes}"
            found = crc32c(data[offset : offset + nbytes]) if nbytes else 0
            if found != crc:
                return o, f"bytes [{offset}, {offset + nbytes}) have crc {hexcrc(found)}, recorded {hexcrc(crc)}"
            owners[o].verified.add((offset, nbytes))
    b = manifest.blob_for(rank)
    try:
        check_blob(manifest, rank, bytes(owners[b.rank].data[b.offset : b.offset + b.nbytes]))
    except IntegrityError as e:
        return b.rank, str(e)
    return None


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


def _process_group_transport(timeout_s: float) -> Any:
    """A transport on a new group with the job's own backend (a gloo job on a machine with a
    GPU stays on gloo; an NCCL job stages host bytes through its device)."""
    import torch.distributed as dist

    from ..distributed.transport import ProcessGroupTransport

    backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None
    return ProcessGroupTransport(timeout_s=timeout_s, backend=backend)
