"""The decisions of a memory restore: what the nodes hold -> the step and its copies -> the plan.

Where it sits: pure functions under :mod:`recoverkit.recovery.memory` (which runs the
exchanges between ranks); they read no shared memory except :func:`scan` (this node's
slots) and move no bytes. Everything a rank reports is parsed here as hostile input
(:meth:`HeldCopy.from_json`, :func:`unb64`, :func:`check_index`)::

    scan (every rank)            this node's slots -> [HeldCopy] (owner, own/replica, step,
                                 index CRC and size, data bytes, run id, world size); a
                                 rank's host snapshots are reported alike (``memory_held``)
    choose (rank 0)              every rank's report -> the newest step every owner rank
                                 holds in a live place (not a damaged copy), unless a disk is
                                 newer; per owner the copies with the same index, own first
    manifest_of (every rank)     every owner's index -> build_manifest -> format/validate
    needed_regions / plan_fetches  what each rank reads of each owner, and the transfers
                                 to ranks that read no copy of an owner they need

A *place* is where a rank reads copies without a transfer: its node's shared memory (named
by the node) or its own process's host memory (``host:rank-RRRRR``, read by that rank only).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..distributed.commit import build_manifest
from ..distributed.fetch import Transfer, plan_transfers
from ..errors import IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.manifest import Manifest, local_prefix
from ..format.shm_index import MAX_DATA_BYTES, MAX_INDEX_BYTES, ShmIndex, decode_index
from ..format.validate import check_manifest
from ..storage.base import RankRecords, ReadableTier
from ..storage.shm import ShmStore
from .memory_source import data_name

__all__ = [
    "HOST_PLACE", "MAX_OWNERS", "Bad", "Box", "CopyKey", "HeldCopy", "b64", "bad_set", "blob_owner", "check_index", "choose",
    "held_of", "wants_json", "wants_of",
    "manifest_of", "needed_regions", "newest_on", "places_of", "plan_fetches", "scan", "span", "unb64",
]  # fmt: skip

#: a copy of one owner's snapshot in one place: (place, is a replica); a place is a node's
#: shared memory (the node's name) or one process's host memory (``host:rank-RRRRR``)
CopyKey = tuple[str, bool]
#: a copy found damaged: (owner, step, place, is a replica)
Bad = tuple[int, int, str, bool]

#: a region of a global tensor, ``(offsets, shape)``: what a rank's sharded target holds
Box = tuple[tuple[int, ...], tuple[int, ...]]
#: the most sharded targets and dimensions a rank may report wanting
MAX_WANTS, MAX_DIMS = 1 << 16, 64
#: the most owner ranks a snapshot in memory may name (a copy's world size beyond it is ignored)
MAX_OWNERS = 1 << 16
#: the prefix of a place that is one process's host memory (a node's name has no ':')
HOST_PLACE = "host:"
_OWNER_DIR = re.compile(r"(rank|replica)-(\d{5})")
_LOCAL_KEY = re.compile(r"rank-\d{5}/")


@dataclass(frozen=True)
class HeldCopy:
    """What one node reports of one complete slot.

    Example:
        >>> c = HeldCopy(owner=2, replica=True, step=7, crc=5, size=100, data_bytes=4096, run_id="r", world_size=4)
        >>> HeldCopy.from_json(c.to_json()) == c
        True
    """

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
    def from_json(cls, d: Any) -> HeldCopy:
        """Parse strictly: 8 fields, non-negative integers in range and a string run id."""
        if type(d) is not list or len(d) != 8 or type(d[6]) is not str:
            raise IntegrityError(f"a held snapshot is 8 fields, got {str(d)[:80]}")
        ints = [d[i] for i in (0, 1, 2, 3, 4, 5, 7)]
        if any(type(x) is not int or x < 0 for x in ints) or d[1] > 1 or d[4] > MAX_INDEX_BYTES or d[5] > MAX_DATA_BYTES:
            raise IntegrityError(f"held snapshot {str(d)[:80]}: fields out of range")
        return cls(d[0], bool(d[1]), d[2], d[3], d[4], d[5], d[6], d[7])


def scan(stores: Sequence[ShmStore]) -> list[HeldCopy]:
    """Every complete snapshot in this node's job dirs (own ones and replicas), its index's CRC."""
    out: dict[tuple[int, bool, int], HeldCopy] = {}
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
                    HeldCopy(owner, replica, step, crc32c(raw), len(raw), idx.data_bytes, idx.run_id, idx.world_size),
                )
    return list(out.values())


def _owner_dirs(job_dir: str) -> Iterator[tuple[int, bool]]:
    try:
        names = sorted(os.listdir(job_dir))
    except OSError:
        return
    for n in names:
        m = _OWNER_DIR.fullmatch(n)
        if m is not None:
            yield int(m.group(2)), m.group(1) == "replica"


def newest_on(tiers: Sequence[ReadableTier]) -> int:
    """The newest step any of ``tiers`` lists (-1 if none)."""
    newest = -1
    for t in tiers:
        try:
            newest = max([newest, *t.steps()])
        except OSError:
            continue
    return newest


def choose(reports: Sequence[Mapping[str, Any]], *, world: int, bad: set[Bad], step: int | None) -> dict[str, Any]:
    """Rank 0's choice from every rank's report (index = rank).

    A report is ``{"node", "places", "held", "disk"}``: ``places`` the places the rank reads
    from without a transfer (its node's shared memory, its own host memory; default
    ``[node]``), ``held`` the copies there (``{place: [HeldCopy JSON]}``, or a list of the
    node's copies).

    The newest step (``step`` if given) that every owner rank of the world that saved it
    holds in some reported place, from one run, leaving out the ``bad`` copies; refused when
    a disk holds a newer step. The owners are the snapshot's ranks ``0..W_old-1`` (each
    copy's index names its world): ``W_old`` may differ from the restoring world ``world``
    (a shrink or a grow: ``owners`` says which; at the same step, a snapshot of ``world``
    ranks is preferred). Per owner: the copy whose index is used (its own snapshot
    first, then the place the most ranks read, this process's host memory before shared
    memory, then rank 0's place, then by name) and every copy with the same index (the
    holders its bytes may come from); ``index_from``: who sends rank 0 an index its places
    lack. ``warn``: a refusal that leaves something newer than the disk unused.

    Example:
        >>> held = lambda o, r=False: HeldCopy(o, r, 7, 9, 10, 64, "run", 2).to_json()
        >>> reports = [{"node": "a", "held": [held(0), held(1, True)], "disk": 5},
        ...            {"node": "b", "held": [held(1)], "disk": 5}]
        >>> c = choose(reports, world=2, bad=set(), step=None)
        >>> c["step"], c["owners"], c["holders"]["1"], c["index_from"], c["places"]
        (7, 2, [['b', False], ['a', True]], {}, [['a'], ['b']])
        >>> choose(reports[:1], world=1, bad=set(), step=None)["owners"]  # a shrink 2 -> 1
        2
    """
    places = [places_of(rep) for rep in reports]
    readers: dict[str, int] = {}
    for ps in places:
        for p in ps:
            readers[p] = readers.get(p, 0) + 1
    disk = max(int(rep["disk"]) for rep in reports)
    by_step: dict[tuple[int, str, int], dict[int, dict[CopyKey, HeldCopy]]] = {}
    newest = -1
    for rep, ps in zip(reports, places):
        for place, c in held_of(rep, ps):
            if not 0 < c.world_size <= MAX_OWNERS or c.owner >= c.world_size:
                continue
            newest = max(newest, c.step)
            if (c.owner, c.step, place, c.replica) not in bad:
                by_step.setdefault((c.step, c.run_id, c.world_size), {}).setdefault(c.owner, {})[(place, c.replica)] = c
    wanted = [k for k in by_step if step is None or k[0] == step]
    complete = sorted((k for k in wanted if len(by_step[k]) == k[2]), key=lambda k: (k[0], k[2] == world, k),
                      reverse=True)  # fmt: skip
    if not complete:
        what = "step" if step is None else f"step {step}"
        return {"ok": False, "reason": f"no {what} is complete in memory on the live nodes{_missing(wanted, by_step)}",
                "warn": newest > disk}
    chosen_step, run_id, owners = complete[0]
    if disk > chosen_step:
        return {"ok": False, "reason": f"the disk holds step {disk}, newer than step {chosen_step} in memory"}
    crcs: dict[str, int] = {}
    holders: dict[str, Any] = {}
    index_from: dict[str, int] = {}

    def rank_of(key: CopyKey) -> tuple[bool, int, bool, bool, str]:
        place, replica = key
        return replica, -readers.get(place, 0), not place.startswith(HOST_PLACE), place not in places[0], place

    for o in range(owners):
        ranked = sorted(by_step[(chosen_step, run_id, owners)][o].items(), key=lambda kv: rank_of(kv[0]))
        first = ranked[0][1]
        same = [k for k, c in ranked if c.crc == first.crc and c.size == first.size]
        crcs[str(o)] = first.crc
        holders[str(o)] = [[n, r] for n, r in same]
        if not set(places[0]) & {n for n, _ in same}:  # rank 0 lacks it: the first rank of a holder sends it
            index_from[str(o)] = min(r for r, ps in enumerate(places) if same[0][0] in ps)
    return {"ok": True, "step": chosen_step, "owners": owners, "nodes": [ps[0] for ps in places], "places": places, "crcs": crcs,
            "holders": holders, "index_from": index_from}


def places_of(rep: Mapping[str, Any]) -> list[str]:
    """A report's places (``[node]`` when it names none), parsed as hostile input."""
    places = rep.get("places")
    if places is None:
        return [str(rep["node"])]
    if type(places) is not list or not places or len(places) > 16 or any(type(p) is not str for p in places):
        raise IntegrityError(f"a rank's places are 1-16 strings, got {str(places)[:80]}")
    return list(places)


def held_of(rep: Mapping[str, Any], places: Sequence[str]) -> Iterator[tuple[str, HeldCopy]]:
    """``(place, copy)`` of every copy a report names, each copy parsed as hostile input."""
    held = rep["held"]
    if type(held) is dict:
        for place, copies in held.items():
            if place not in places or type(copies) is not list:
                raise IntegrityError(f"a rank reports copies in {str(place)[:40]!r}, not one of its places")
            for c in copies:
                yield place, HeldCopy.from_json(c)
    elif type(held) is list:
        for c in held:
            yield places[0], HeldCopy.from_json(c)
    else:
        raise IntegrityError(f"a rank's held copies are a list or a mapping, got {type(held).__name__}")


def _missing(wanted: Sequence[tuple[int, str, int]], by_step: Mapping[tuple[int, str, int], Mapping[int, Any]]) -> str:
    """Which owners the newest step held in memory lacks, for the warning."""
    if not wanted:
        return " (none held)"
    s, r, w = max(wanted)
    lacking = sorted(set(range(w)) - set(by_step[(s, r, w)]))
    return f" (newest: step {s}, whose snapshots of rank(s) {lacking} no live node holds intact)"


def check_index(data: bytes, owner: int, step: int, crc: int, world: int, where: str) -> ShmIndex:
    """``data`` decoded as hostile input, if it is the chosen copy's index of ``owner``'s ``step``."""
    found = crc32c(data)
    if found != crc:
        raise IntegrityError(f"{where}: index crc {hexcrc(found)}, the chosen copy's {hexcrc(crc)}")
    idx = decode_index(data, path=where)
    if idx.rank != owner or idx.step != step or idx.world_size != world:
        raise IntegrityError(f"{where}: index of rank {idx.rank} step {idx.step} world {idx.world_size}")
    return idx


def manifest_of(step: int, indexes: Mapping[int, ShmIndex]) -> Manifest:
    """The manifest of ``step`` from every owner's index (``0..W-1``), through the one gate."""
    run_ids = {i.run_id for i in indexes.values()}
    if len(run_ids) != 1:
        raise IntegrityError(f"the snapshots of step {step} come from several runs {sorted(run_ids)}")
    ranks = [(RankRecords(i.rank, i.blob, list(i.shards), dict(i.files)), i.meta) for _, i in sorted(indexes.items())]
    world = len(ranks)
    manifest = build_manifest(step=step, run_id=run_ids.pop(), world_size=world, ranks=ranks)
    check_manifest(manifest, where=f"memory snapshot of step {step}")
    names = {data_name(o) for o in range(world)}
    for name in manifest.files:
        if name not in names:
            raise IntegrityError(f"memory snapshot of step {step}: file {name!r} is no rank's")
    return manifest


def blob_owner(manifest: Manifest, rank: int) -> int:
    """Whose object state and rank-local tensors rank ``rank`` restores: its own, or rank
    0's when the snapshot's world had no rank ``rank`` (it grew): the reader's rule for a
    disk (``restore.reader.blob_rank``), without its warning (the reader gives it).

    Example:
        >>> from recoverkit.format.manifest import BlobRecord
        >>> m = Manifest(step=1, run_id="r", world_size=1, blobs=(BlobRecord(0, data_name(0), 0, 4, 0),))
        >>> blob_owner(m, 0), blob_owner(m, 2)
        (0, 0)
    """
    return rank if any(b.rank == rank for b in manifest.blobs) else 0


def wants_json(wants: Mapping[str, Box] | None) -> dict[str, list[list[int]]] | None:
    """The sharded targets a rank holds, for its report (None: not known)."""
    return None if wants is None else {k: [list(o), list(n)] for k, (o, n) in wants.items()}


def wants_of(d: Any) -> dict[str, Box] | None:
    """A rank's reported sharded targets, parsed as hostile input: a bounded mapping of
    tensor keys to ``[offsets, shape]`` of non-negative integers of one length.

    Example:
        >>> wants_of(wants_json({"w": ((4, 0), (4, 8))}))
        {'w': ((4, 0), (4, 8))}
    """
    if d is None:
        return None
    if type(d) is not dict or len(d) > MAX_WANTS:
        raise IntegrityError(f"a rank's sharded targets are a mapping of at most {MAX_WANTS}, got {str(d)[:80]}")
    out: dict[str, Box] = {}
    for k, box in d.items():
        ok = type(k) is str and len(k) <= 4096 and type(box) is list and len(box) == 2
        ok = ok and all(type(v) is list and len(v) == len(box[0]) <= MAX_DIMS for v in box)
        if not ok or any(type(x) is not int or not 0 <= x < 1 << 62 for v in box for x in v):
            raise IntegrityError(f"a rank's sharded target {str(k)[:80]!r} is not [offsets, shape]: {str(box)[:80]}")
        out[k] = (tuple(box[0]), tuple(box[1]))
    return out


def _overlaps(a: Box, b: Box) -> bool:
    """Whether two regions of one tensor share an element (the reader's rule: a piece that
    overlaps a target's region is read)."""
    return len(a[0]) == len(b[0]) and all(
        max(ao, bo) < min(ao + an, bo + bn) for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1])
    )


def needed_regions(
    manifest: Manifest, rank: int, *, alone: bool = False, wants: Mapping[str, Box] | None = None
) -> dict[int, dict[tuple[int, int], int]]:
    """What rank ``rank`` reads of each owner's bytes to restore ``manifest``: owner ->
    ``{(offset, nbytes): crc32c}`` of its object blob, its rank-local tensors and every
    tensor that is not another rank's local one (replicated and sharded ones, all pieces).
    ``rank`` is a rank of the restoring world, which may differ from the snapshot's: a rank
    the snapshot's world had not restores rank 0's object blob and rank-local tensors
    (:func:`blob_owner`). ``wants``: the region the rank's target holds of each sharded
    tensor (a ShardedTensor or DTensor target, by key): only the saved pieces overlapping it
    are read, as the reader reads them; a sharded tensor not named there comes whole.
    ``alone``: the rank's own snapshot restores it alone (its index says
    ``self_contained``: e.g. FSDP shards, rank-local state): only its own bytes, so a job
    whose snapshots all restore their rank alone moves nothing between ranks (a restore
    that asks for more, into another sharding, finds it missing and goes to the disk).

    Example:
        >>> from recoverkit.format.manifest import BlobRecord
        >>> blobs = tuple(BlobRecord(r, data_name(r), 0, 4, 0) for r in (0, 1))
        >>> m = Manifest(step=1, run_id="r", world_size=2, blobs=blobs, files={data_name(0): 4, data_name(1): 4})
        >>> needed_regions(m, 1)
        {1: {(0, 4): 0}}
    """
    out: dict[int, dict[tuple[int, int], int]] = {}
    src = blob_owner(manifest, rank)
    b = manifest.blob_for(src)
    out.setdefault(b.rank, {})[(b.offset, b.nbytes)] = b.crc32c
    mine = local_prefix(src) + "/"
    for key, rec in manifest.tensors.items():
        if _LOCAL_KEY.match(key) and not key.startswith(mine):
            continue
        box = wants.get(key) if wants is not None and rec.alias_of is None else None
        for s in rec.shards:
            if box is not None and not _overlaps((tuple(s.offsets), tuple(s.shape)), box):
                continue
            region = s.pack if s.pack is not None else s
            out.setdefault(region.rank, {})[(region.offset, region.nbytes)] = region.crc32c
    return {rank: out.get(rank, {})} if alone else out


def span(regions: Mapping[tuple[int, int], int]) -> tuple[int, int]:
    """The smallest byte range covering ``regions``, as ``(offset, nbytes)``.

    Example:
        >>> span({(100, 10): 0, (0, 4): 0})
        (0, 110)
    """
    lo = min(o for o, _ in regions)
    hi = max(o + n for o, n in regions)
    return lo, hi - lo


def plan_fetches(
    manifest: Manifest, places: Sequence[str | Sequence[str]], holders: Mapping[int, Sequence[CopyKey]],
    alone: Collection[int] = (), wants: Sequence[Mapping[str, Box] | None] | None = None,
) -> list[Transfer]:
    """What every rank that reads no copy of an owner it needs fetches (the span of its
    regions), each from a rank that reads a copy, the load spread over them. ``places[r]``:
    the place(s) rank ``r`` reads without a transfer (a node's name, or a list); ``alone``:
    the ranks whose own snapshot restores them alone; ``wants[r]``: the sharded targets of
    rank ``r`` (:func:`needed_regions`)."""
    mine = [{p} if isinstance(p, str) else set(p) for p in places]
    needs: dict[int, dict[int, tuple[int, int]]] = {}
    senders: dict[int, list[int]] = {}
    for o, hs in holders.items():
        held_on = {n for n, _ in hs}
        senders[o] = [r for r, ps in enumerate(mine) if ps & held_on]
    for r, ps in enumerate(mine):
        box = wants[r] if wants is not None else None
        for o, rs in needed_regions(manifest, r, alone=r in alone, wants=box).items():
            if not ps & {n for n, _ in holders[o]}:
                needs.setdefault(r, {})[o] = span(rs)
    return plan_transfers(needs, senders)


def bad_set(items: Any, step: int) -> set[Bad]:
    """The damaged copies a verdict names (``[[owner, node, replica], ...]``) of ``step``."""
    return {(int(o), step, str(n), bool(r)) for o, n, r in items}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any) -> bytes:
    """An index sent through the coordinator, bounded before it is decoded."""
    if type(text) is not str or len(text) > MAX_INDEX_BYTES * 4 // 3 + 4:
        raise IntegrityError("an index sent by a rank is not a bounded base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise IntegrityError(f"an index sent by a rank is not base64: {e}") from None
