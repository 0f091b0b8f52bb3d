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

import base64
import logging
import mmap
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..distributed.commit import build_manifest
from ..distributed.coordinator import Coordinator
from ..distributed.fetch import Transfer, plan_transfers, run_transfers
from ..errors import CommitTimeoutError, IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.manifest import Manifest, local_prefix
from ..format.shm_index import MAX_DATA_BYTES, MAX_INDEX_BYTES, ShmIndex, decode_index
from ..format.validate import check_manifest
from ..restore.reader import check_blob
from ..storage.base import RankRecords, ReadableTier
from ..storage.discovery import CheckpointSkippedWarning
from ..storage.shm import ShmStore
from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use
from .memory_source import MemoryTier, OwnerBytes, data_name
from .tier_fallback import TierSource

__all__ = ["MemoryRestore", "MemorySkippedWarning", "needed_regions"]

log = logging.getLogger("recoverkit")

#: attempts of one restore (each excludes the copies the one before found damaged)
MAX_TRIES = 4
_OWNER_DIR = re.compile(r"(rank|replica)-(\d{5})")
_LOCAL_KEY = re.compile(r"rank-\d{5}/")
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


#: a copy of one owner's snapshot of one step on one node: (node, replica?)
CopyKey = tuple[str, bool]


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
        bad: set[tuple[int, int, str, bool]] = set()  # (owner, step, node, replica) found damaged
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
        try:
            source = TierSource(tier, tier.step, tier.manifest(tier.step))
            return Recovered(self.name, source, use(source))
        except (IntegrityError, OSError) as e:  # verified, then damaged meanwhile (a writer?)
            warnings.warn(f"memory restore of step {tier.step}: {e}", MemorySkippedWarning, stacklevel=4)
            return CannotRecover(self.name, f"step {tier.step} from memory failed: {e}", e)
        finally:
            tier.close()

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
@dataclass
class _Ready:
    tier: MemoryTier


@dataclass
class _Refused:
    reason: str
    warn: bool = False
    bad: set[tuple[int, int, str, bool]] = field(default_factory=set)


@dataclass(frozen=True)
class _Copy:
    """What one node reports of one slot (hostile until checked: ints and strings)."""

    owner: int
    replica: bool
    step: int
    crc: int
    size: int
    data_bytes: int
    run_id: str
    world_size: int

    def to_json(self) -> list[Any]:
        return [self.owner, int(self.replica), self.step, self.crc, self.size, self.data_bytes, self.run_id, self.world_size]

    @classmethod
    def from_json(cls, d: Any) -> _Copy:
        if type(d) is not list or len(d) != 8 or type(d[6]) is not str:
            raise IntegrityError(f"a held snapshot is 8 fields, got {str(d)[:80]}")
        ints = [d[i] for i in (0, 1, 2, 3, 4, 5, 7)]
        if any(type(x) is not int or x < 0 for x in ints) or d[4] > MAX_INDEX_BYTES or d[5] > MAX_DATA_BYTES:
            raise IntegrityError(f"held snapshot {str(d)[:80]}: fields out of range")
        return cls(d[0], bool(d[1]), d[2], d[3], d[4], d[5], d[6], d[7])


# ---------------------------------------------------------------------- one attempt
class _Attempt:
    """One round of the protocol (the module docstring) on this rank."""

    def __init__(
        self, strategy: MemoryRestore, scope: str, loss: Loss, disk: Sequence[ReadableTier],
        bad: set[tuple[int, int, str, bool]],
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
        mine = {"node": self.node, "held": [c.to_json() for c in _scan(self.stores)], "disk": _newest_on(self.disk)}
        choice = self._exchange("held", mine, self._choose, "choice")
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
                send[str(o)] = _b64(self._open_here(o, step, crcs[o]).index_bytes)
            except (IntegrityError, OSError):  # gone meanwhile: rank 0 finds it missing
                pass
        plan = self._exchange("index", {"indexes": send}, lambda g: self._plan(g, step, nodes, crcs, holders), "plan")
        if not plan["ok"]:
            return _Refused(str(plan["reason"]), warn=bool(plan.get("warn")), bad=_bad_set(plan.get("bad", ()), step))
        # 3. the same manifest here, validated; local bytes mapped, remote ones fetched, verified
        report, tier = self._fetch_and_verify(step, nodes, crcs, holders, plan)
        verdict = self._exchange("verified", report, self._judge, "verdict")
        if not verdict["ok"] or tier is None:
            if self.strategy.transport_built:
                self.strategy.drop_transport()  # a failed transfer may have broken it
            return _Refused(str(verdict["reason"]), warn=True, bad=_bad_set(verdict.get("bad", ()), step))
        return _Ready(tier)

    # ------------------------------------------------------------------ rank 0's decisions
    def _choose(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        nodes = [str(rep["node"]) for rep in reports]
        disk = max(int(rep["disk"]) for rep in reports)
        by_step: dict[tuple[int, str], dict[int, dict[CopyKey, _Copy]]] = {}
        newest = -1
        for rep, node in zip(reports, nodes):
            for c in map(_Copy.from_json, rep["held"]):
                if c.world_size != self.world or c.owner >= self.world:
                    continue
                newest = max(newest, c.step)
                if (c.owner, c.step, node, c.replica) in self.bad:
                    continue
                by_step.setdefault((c.step, c.run_id), {}).setdefault(c.owner, {})[(node, c.replica)] = c
        wanted = [k for k in by_step if self.loss.step is None or k[0] == self.loss.step]
        complete = sorted((k for k in wanted if len(by_step[k]) == self.world), reverse=True)
        if not complete:
            what = "step" if self.loss.step is None else f"step {self.loss.step}"
            missing = _missing(by_step, self.world, self.loss.step)
            return {"ok": False, "reason": f"no {what} is complete in memory on the live nodes{missing}",
                    "warn": newest > disk}
        step, run_id = complete[0]
        if disk > step:
            return {"ok": False, "reason": f"the disk holds step {disk}, newer than step {step} in memory"}
        crcs: dict[str, int] = {}
        holders: dict[str, Any] = {}
        index_from: dict[str, int] = {}
        for o in range(self.world):  # the owner's own snapshot first, then replicas; rank 0's node first
            ranked = sorted(by_step[(step, run_id)][o].items(), key=lambda kv: (kv[0][1], kv[0][0] != nodes[0], kv[0][0]))
            chosen = ranked[0][1]
            same = [k for k, c in ranked if c.crc == chosen.crc and c.size == chosen.size]
            crcs[str(o)] = chosen.crc
            holders[str(o)] = [[n, r] for n, r in same]
            if nodes[0] not in {n for n, _ in same}:  # rank 0 lacks it: the first rank of a holder sends it
                index_from[str(o)] = min(r for r, n in enumerate(nodes) if n == same[0][0])
        return {"ok": True, "step": step, "nodes": nodes, "crcs": crcs, "holders": holders, "index_from": index_from}

    def _plan(
        self, gathered: list[dict[str, Any]], step: int, nodes: list[str],
        crcs: Mapping[int, int], holders: Mapping[int, list[CopyKey]],
    ) -> dict[str, Any]:
        raw: dict[int, bytes] = {}
        for rep in gathered:
            for o, text in rep["indexes"].items():
                raw[int(o)] = _unb64(text)
        indexes: dict[int, ShmIndex] = {}
        for o in range(self.world):
            node, replica = holders[o][0]
            try:
                if o not in raw:
                    raw[o] = self._open_here(o, step, crcs[o]).index_bytes
                indexes[o] = _check_index(raw[o], o, step, crcs[o], self.world, f"rank {o}'s index from node {node}")
            except (IntegrityError, OSError) as e:
                return {"ok": False, "reason": f"rank {o}'s snapshot of step {step} on node {node}: {e}",
                        "warn": True, "bad": [[o, node, replica]]}
        try:
            manifest = _manifest(step, indexes)
        except (IntegrityError, ValueError, KeyError) as e:  # the copies do not fit together: not this step
            return {"ok": False, "reason": f"step {step} in memory does not form a valid checkpoint: {e}",
                    "warn": True, "bad": [[o, n, r] for o in range(self.world) for n, r in holders[o]]}
        transfers = _transfers(manifest, nodes, holders)
        lacking = {o for o in range(self.world) for n in nodes if n not in {h for h, _ in holders[o]}}
        return {"ok": True, "indexes": {str(o): _b64(raw[o]) for o in sorted(lacking)},
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
        """This rank's part of step 3: its report for rank 0, and the tier if it verified."""
        used: dict[int, CopyKey] = {}  # owner -> the copy this rank's bytes come from
        try:
            transfers = [Transfer.from_json(t, world_size=self.world) for t in plan["transfers"]]
            transport = self.strategy.transport_for(self.timeout_s) if transfers else None
            shipped = {int(o): _unb64(t) for o, t in plan["indexes"].items()}
            local = {o for o in range(self.world) if self.node in {n for n, _ in holders[o]}}
            indexes: dict[int, ShmIndex] = {}
            for o in range(self.world):
                if o in local:
                    v = self._open_here(o, step, crcs[o])
                    indexes[o] = _check_index(v.index_bytes, o, step, crcs[o], self.world, v.path)
                    kind = "replica" if v.slots.replica else "own shm"
                    self._owners[o] = OwnerBytes(v.data, v.address, f"{kind} on node {self.node}", close=v.close)
                    self._owned.add(id(v))
                    used[o] = (self.node, bool(v.slots.replica))
                else:
                    indexes[o] = _check_index(shipped[o], o, step, crcs[o], self.world, f"rank {o}'s index (via rank 0)")
            manifest = _manifest(step, indexes)  # the one gate, on this rank too
            regions = needed_regions(manifest, self.rank)
            mine = sorted((t.owner, t.offset, t.nbytes) for t in transfers if t.dst == self.rank)
            want = sorted((o, *_span(rs)) for o, rs in regions.items() if o not in local)
            if mine != want:
                raise IntegrityError(f"rank 0's plan sends this rank {mine}, it needs {want}")
            for t in transfers:
                if t.dst != self.rank:
                    continue
                size = indexes[t.owner].data_bytes  # validated: every record lies inside it
                buf = mmap.mmap(-1, max(size, 1))  # pages are given only as the bytes land
                view = memoryview(buf)[:size]
                where = f"node {nodes[t.src]} via rank {t.src}"
                self._owners[t.owner] = OwnerBytes(view, _mmap_address(buf), where, close=_closer(view, buf))
                used[t.owner] = next(((n, r) for n, r in holders[t.owner] if n == nodes[t.src]), (nodes[t.src], True))
            if transport is not None:
                run_transfers(
                    transport, transfers, timeout_s=self.timeout_s,
                    source=lambda t: self._open_here(t.owner, step, crcs[t.owner]).data[t.offset : t.offset + t.nbytes],
                    sink=lambda t: self._owners[t.owner].data[t.offset : t.offset + t.nbytes],
                )
            fault = _verify(manifest, self.rank, regions, self._owners)
        except Exception as e:  # noqa: BLE001 - reported to rank 0: every rank falls back together
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "bad": []}, None
        if fault is not None:
            owner, error = fault
            node, replica = used.get(owner, (self.node, False))
            where = self._owners[owner].where if owner in self._owners else "not gathered"
            log.warning("recoverkit: rank %d: rank %d's snapshot of step %d from %s is damaged: %s",
                        self.rank, owner, step, where, error)
            return {"ok": False, "error": f"rank {owner}'s snapshot from {where}: {error}",
                    "bad": [[owner, node, replica]]}, None
        return {"ok": True}, MemoryTier(manifest, self._owners)

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
def needed_regions(manifest: Manifest, rank: int) -> dict[int, dict[tuple[int, int], int]]:
    """What rank ``rank`` reads of each owner's bytes to restore ``manifest``: owner ->
    ``{(offset, nbytes): crc32c}`` of its object blob, its rank-local tensors and every
    tensor that is not another rank's local one (replicated and sharded ones, all pieces).

    Example:
        >>> from recoverkit.format.manifest import BlobRecord
        >>> blobs = tuple(BlobRecord(r, data_name(r), 0, 4, 0) for r in (0, 1))
        >>> m = Manifest(step=1, run_id="r", world_size=2, blobs=blobs, files={data_name(0): 4, data_name(1): 4})
        >>> needed_regions(m, 1)
        {1: {(0, 4): 0}}
    """
    out: dict[int, dict[tuple[int, int], int]] = {}
    b = manifest.blob_for(rank)
    out.setdefault(b.rank, {})[(b.offset, b.nbytes)] = b.crc32c
    mine = local_prefix(rank) + "/"
    for key, rec in manifest.tensors.items():
        if _LOCAL_KEY.match(key) and not key.startswith(mine):
            continue
        for s in rec.shards:
            region = s.pack if s.pack is not None else s
            out.setdefault(region.rank, {})[(region.offset, region.nbytes)] = region.crc32c
    return out


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


def _scan(stores: Sequence[ShmStore]) -> list[_Copy]:
    """Every complete snapshot in this node's job dirs (own and replicas), with its index CRC."""
    out: dict[tuple[int, bool, int], _Copy] = {}
    for store in stores:
        for owner, replica in _owner_dirs(store.job_dir):
            slots = store.slots(owner, replica=replica)
            try:
                steps = slots.steps()
            except OSError:
                continue
            for step in steps:
                try:
                    with slots.open(step) as v:
                        raw, idx = v.index_bytes, v.index
                except (IntegrityError, OSError):  # overwritten or removed meanwhile
                    continue
                out.setdefault(
                    (owner, replica, step),
                    _Copy(owner, replica, step, crc32c(raw), len(raw), idx.data_bytes, idx.run_id, idx.world_size),
                )
    return list(out.values())


def _owner_dirs(job_dir: str) -> Iterator[tuple[int, bool]]:
    import os

    try:
        names = sorted(os.listdir(job_dir))
    except OSError:
        return
    for n in names:
        m = _OWNER_DIR.fullmatch(n)
        if m is not None:
            yield int(m.group(2)), m.group(1) == "replica"


def _newest_on(tiers: Sequence[ReadableTier]) -> int:
    newest = -1
    for t in tiers:
        try:
            newest = max([newest, *t.steps()])
        except OSError:
            continue
    return newest


def _check_index(data: bytes, owner: int, step: int, crc: int, world: int, where: str) -> ShmIndex:
    if crc32c(data) != crc:
        raise IntegrityError(f"{where}: index crc {hexcrc(crc32c(data))}, the chosen copy's {hexcrc(crc)}")
    idx = decode_index(data, path=where)
    if idx.rank != owner or idx.step != step or idx.world_size != world:
        raise IntegrityError(f"{where}: index of rank {idx.rank} step {idx.step} world {idx.world_size}")
    return idx


def _manifest(step: int, indexes: Mapping[int, ShmIndex]) -> Manifest:
    """The manifest of ``step`` from every owner's index, through the one gate."""
    run_ids = {i.run_id for i in indexes.values()}
    if len(run_ids) != 1:
        raise IntegrityError(f"the snapshots of step {step} come from several runs {sorted(run_ids)}")
    ranks = [
        (RankRecords(i.rank, i.blob, list(i.shards), dict(i.files)), i.meta)
        for _, i in sorted(indexes.items())
    ]
    world = len(ranks)
    manifest = build_manifest(step=step, run_id=run_ids.pop(), world_size=world, ranks=ranks)
    check_manifest(manifest, where=f"memory snapshot of step {step}")
    for name, size in manifest.files.items():
        if name not in {data_name(o) for o in range(world)}:
            raise IntegrityError(f"memory snapshot of step {step}: file {name!r} ({size} bytes) is no rank's")
    return manifest


def _span(regions: Mapping[tuple[int, int], int]) -> tuple[int, int]:
    """The smallest byte range covering ``regions``: ``(offset, nbytes)``."""
    lo = min(o for o, _ in regions)
    hi = max(o + n for o, n in regions)
    return lo, hi - lo


def _transfers(manifest: Manifest, nodes: Sequence[str], holders: Mapping[int, list[CopyKey]]) -> list[Transfer]:
    """Rank 0: what every rank whose node has no copy of an owner it needs fetches, and from whom."""
    needs: dict[int, dict[int, tuple[int, int]]] = {}
    senders: dict[int, list[int]] = {}
    for o, hs in holders.items():
        held_on = {n for n, _ in hs}
        senders[o] = [r for r, n in enumerate(nodes) if n in held_on]
    for r, node in enumerate(nodes):
        for o, rs in needed_regions(manifest, r).items():
            if node not in {n for n, _ in holders[o]}:
                needs.setdefault(r, {})[o] = _span(rs)
    return plan_transfers(needs, senders)


def _missing(by_step: Mapping[tuple[int, str], Mapping[int, Any]], world: int, step: int | None) -> str:
    """Which owners the newest step held in memory lacks, for the warning."""
    steps = [k for k in by_step if step is None or k[0] == step]
    if not steps:
        return " (none held)"
    s, r = max(steps)
    lacking = sorted(set(range(world)) - set(by_step[(s, r)]))
    return f" (newest: step {s}, whose snapshots of rank(s) {lacking} no live node holds)"


def _bad_set(items: Any, step: int) -> set[tuple[int, int, str, bool]]:
    return {(int(o), step, str(n), bool(r)) for o, n, r in items}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if type(text) is not str or len(text) > MAX_INDEX_BYTES * 4 // 3 + 4:
        raise IntegrityError("an index sent by a rank is not a bounded base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise IntegrityError(f"an index sent by a rank is not base64: {e}") from None


def _mmap_address(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _closer(view: memoryview, buf: mmap.mmap) -> Callable[[], None]:
    def close() -> None:
        view.release()
        try:
            buf.close()
        except BufferError:  # a view handed out is still alive: unmapped when it is collected
            pass

    return close


def _process_group_transport(timeout_s: float) -> Any:
    from ..distributed.transport import ProcessGroupTransport

    return ProcessGroupTransport(timeout_s=timeout_s)
