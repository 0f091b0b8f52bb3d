"""One attempt of a memory restore on this rank: exchange, plan, fetch and verify, verdict.

Where it sits: under :class:`~recoverkit.recovery.memory.MemoryRestore` (the strategy), which
runs up to ``MAX_TRIES`` attempts, each in a scope of its own on the coordinator, each
excluding the copies the one before found damaged. An attempt decides nothing alone: rank 0
decides with the pure functions of ``memory_plan`` over every rank's hostile reports, the
places (``memory_held``) open the copies, the bytes come over the peer transport
(``distributed/fetch``), and a verified attempt hands back a
:class:`~recoverkit.recovery.memory_source.MemoryTier` the strategy applies. The flow of one
attempt, every exchange a gather at rank 0 then a broadcast, bounded by the coordinator's
timeout::

    every rank   scan its places: (owner, own/replica, step, index CRC, sizes, world) per
                 place + the newest step on its disk tiers + the regions its sharded
                 targets hold (``_WANTED``, set by ``memory.wanted_regions``) ──gather "held"──►
    rank 0       the newest step S every owner rank of the world that saved it holds in
                 a live place, newer than (or as new as) every disk; for each owner the
                 copy to use (own snapshot first) and who sends rank 0 the indexes it lacks
                                                                ◄──broadcast "choice"──
    holders      indexes rank 0 lacks                                    ──gather "index"──►
    rank 0       manifest of S = build_manifest(every owner's records, meta) + validate;
                 what every rank needs of every owner; transfers from holding ranks to
                 ranks that read no copy, spread over the holders        ◄──broadcast "plan"──
    every rank   prepare: indexes (own places, else the plan), the same manifest, validated
                 here too (the one gate); local bytes mapped, one buffer per transfer to
                 this rank sized from the validated plan; fetch: each needed region's CRC
                 checked as it lands (the only pass: the sender computes none); the local
                 regions and this rank's object blob checked             ──gather "verified"──►
    rank 0       every rank verified? else the copies that failed   ◄──broadcast "verdict"──

The outcome is :class:`_Ready` (the tier, kept open for the strategy) or :class:`_Refused`
(why, whether to warn, the copies found damaged); whatever the attempt opened and does not
hand over is closed. A rank that fails before the transfers still runs them (refusing at
once on both ends), so no peer waits out the timeout for it.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import mmap
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..distributed.fetch import Transfer, run_transfers
from ..errors import CommitTimeoutError, IntegrityError
from ..format.checksum import crc32c
from ..format.manifest import Manifest, PackRecord
from ..format.shm_index import ShmIndex
from ..restore.reader import check_blob
from ..storage.base import ReadableTier
from .base import Loss
from .memory_held import HeldView
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

if TYPE_CHECKING:
    from .memory import MemoryRestore

log = logging.getLogger("recoverkit")

#: the regions this rank's sharded targets hold (``memory.wanted_regions`` sets it around
#: the reader's recovery chain); None: every piece of every sharded tensor
_WANTED: contextvars.ContextVar[dict[str, Box] | None] = contextvars.ContextVar("recoverkit_wanted", default=None)

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
    # imported here, not at the top: restore.in_place imports torch, and importing this
    # module (or recovery.memory) does not. The order of imports is free: staging.plan
    # imports the function from ``recoverkit.state.flatten`` itself, so loading that
    # submodule (which makes the package's ``flatten`` the module) changes nothing it uses
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
