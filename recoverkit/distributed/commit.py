"""The two-phase commit of one step to one tier, across every rank.

::

    rank 0                       every rank                        rank 0
    tier.prepare ──broadcast──►  tier.write_rank (durable) ──gather──►  all ok? manifest last,
                                                                        tier.commit : tier.abort
                 ◄────────────────────────── broadcast outcome ──────────────┘

A rank that fails reports its error; a rank that dies or hangs is named by the gather's
timeout. Either way the coordinator aborts (the staging area is removed, nothing becomes
selectable) and every live rank raises the same :class:`CommitError` naming each failed
rank. Only when every rank's data is durable does the manifest get written, last.

Ranks on hosts whose storage is not rank 0's (node-local disks) adopt the staging area on
their own disk (one rank per disk, ``tier.adopt``), and when rank 0 committed they commit
the same manifest there, so each host can restore its own ranks from its own disk.

Every exchange of a save lives under ``<run id>/<tier>/<seq>``, inside the coordinator's own
namespace; when every rank is done with the save (committed, aborted or timed out), the last
one drops those keys (:meth:`Coordinator.finish`), so the store does not grow with the saves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import CommitError, CommitTimeoutError
from ..format.manifest import Manifest, TensorRecord
from ..gcpause import paused
from ..storage.base import RankPayload, RankRecords, ShardMeta, Tier
from ..storage.faults import FaultInjector
from .coordinator import Coordinator

__all__ = ["CommitRequest", "LocalRank", "build_manifest", "commit_step"]

log = logging.getLogger("recoverkit")


@dataclass
class CommitRequest:
    """What one rank brings to the commit of ``step``."""

    step: int
    run_id: str
    payload: RankPayload
    aliases: Mapping[str, TensorRecord]
    pickled: bool = False
    user_meta: Mapping[str, Any] | None = None
    #: how many saves this run made before this one (the same on every rank): keys the
    #: exchange so a step saved twice never reads the first attempt's answers
    seq: int = 0


def commit_step(
    tier: Tier, coordinator: Coordinator, request: CommitRequest, *, faults: FaultInjector, timeout_s: float
) -> Manifest | None:
    """Run the commit protocol on this rank.

    Returns the manifest on every rank that committed the step to its storage: rank 0, and
    a rank that adopted a storage of its own (node-local disks on several hosts); None on
    the others.
    """
    key = f"{request.run_id}/{tier.name}/{request.seq}"
    try:
        with paused():  # records of 100k tensors: no generational rescans while building them
            return _commit(tier, coordinator, request, key, faults=faults, timeout_s=timeout_s)
    finally:  # this rank read all it will read of this save: the last rank here drops its keys
        coordinator.finish(key, gathers=_GATHERS, broadcasts=_BROADCASTS)


#: the exchanges of one save, under its key (every one of them is dropped once settled)
_GATHERS, _BROADCASTS = ("layout", "report"), ("prepare", "outcome")


def _commit(
    tier: Tier, coordinator: Coordinator, request: CommitRequest, key: str, *, faults: FaultInjector, timeout_s: float
) -> Manifest | None:
    rank, step = coordinator.rank, request.step
    layout: list[ShardMeta] = []
    if tier.needs_layout:
        mine = [ShardMeta(s.key, s.dtype, s.global_shape, s.offsets, s.shape).to_json() for s in request.payload.shards]
        gathered = coordinator.gather(f"{key}/layout", {"shards": mine}, timeout_s=timeout_s)
        layout = [ShardMeta.from_json(m) for rep in (gathered or []) for m in rep["shards"]]
    prep: dict[str, Any] | None = None
    if rank == 0:
        try:
            prep = {"ok": True, "staging": tier.prepare(step, layout)}
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            prep = {"ok": False, "error": _describe(e)}
    prep = coordinator.broadcast(f"{key}/prepare", prep, timeout_s=timeout_s)
    if not prep["ok"]:
        raise CommitError(f"step {step}: could not prepare {tier.name} tier", step=step, failures={0: prep["error"]})
    staging = prep["staging"]

    local_error: BaseException | None = None
    adopted = False
    try:
        adopted = rank != 0 and tier.adopt(staging)
        faults.reached("before_data", step=step, rank=rank)
        if request.payload.error is not None:
            raise request.payload.error
        records = tier.write_rank(staging, request.payload)
        faults.reached("after_data", step=step, rank=rank)
        if coordinator.in_process:  # 100k records: no JSON round trip, the objects themselves
            report = {"ok": True, "records": records, "meta": request, "adopted": adopted}
        else:
            report = {"ok": True, "records": records.to_json(), "meta": _meta(request), "adopted": adopted}
    except Exception as e:  # noqa: BLE001 - reported to the coordinator
        local_error = e
        report = {"ok": False, "error": _describe(e)}

    manifest = None
    if rank == 0:
        outcome, manifest, commit_error = _decide(tier, coordinator, request, staging, report, key, timeout_s)
        local_error = local_error or commit_error
        coordinator.broadcast(f"{key}/outcome", outcome, timeout_s=timeout_s)
    else:
        try:
            coordinator.gather(f"{key}/report", report, timeout_s=timeout_s)
            outcome = coordinator.broadcast(f"{key}/outcome", None, timeout_s=timeout_s)
        except BaseException:
            if adopted:
                _abort_quietly(tier, staging)
            raise
        if adopted:
            manifest = _follow(tier, step, rank, staging, outcome)
    if not outcome["ok"]:
        failures = {int(r): why for r, why in outcome["failures"].items()}
        raise CommitError(f"step {step} was not committed to the {tier.name} tier", step=step, failures=failures) from local_error
    return manifest


def _follow(tier: Tier, step: int, rank: int, staging: str, outcome: dict[str, Any]) -> Manifest | None:
    """A rank with a storage of its own repeats rank 0's decision there.

    Its failure to commit is its own storage's business: rank 0 committed, so the step is
    saved; this host's copy is removed and the host restores from another tier.
    """
    if not outcome["ok"]:
        _abort_quietly(tier, staging)
        return None
    try:
        manifest = Manifest.from_bytes(outcome["manifest"].encode(), path=f"{staging} (from rank 0)")
        tier.commit(step, staging, manifest, rank=rank)
        return manifest
    except Exception as e:  # noqa: BLE001 - see above
        log.warning("recoverkit: rank %d: step %d committed by rank 0 but not on this host's %s tier: %s", rank, step, tier.name, e)
        _abort_quietly(tier, staging)
        return None


def _abort_quietly(tier: Tier, staging: str) -> None:
    try:
        tier.abort(staging)
    except Exception:  # noqa: BLE001 - leftovers are removed at the next start-up
        pass


def _decide(
    tier: Tier,
    coordinator: Coordinator,
    request: CommitRequest,
    staging: str,
    report: dict[str, Any],
    key: str,
    timeout_s: float,
) -> tuple[dict[str, Any], Manifest | None, BaseException | None]:
    """Rank 0: gather every report, then commit or abort."""
    try:
        reports = coordinator.gather(f"{key}/report", report, timeout_s=timeout_s)
        assert reports is not None
        failures = {r: rep["error"] for r, rep in enumerate(reports) if not rep["ok"]}
    except CommitTimeoutError as e:
        reports, failures = [], dict(e.failures)
    manifest = None
    error: BaseException | None = None
    if not failures:
        try:
            manifest = _manifest(request, reports, coordinator.world_size)
            tier.commit(request.step, staging, manifest)
        except Exception as e:  # noqa: BLE001 - becomes the outcome every rank raises
            failures = {0: _describe(e)}
            manifest, error = None, e
    if failures:
        try:
            tier.abort(staging)
        except Exception as e:  # noqa: BLE001 - leftovers are removed at the next start-up
            failures.setdefault(0, f"abort failed too: {_describe(e)}")
        return {"ok": False, "failures": {str(r): why for r, why in failures.items()}}, None, error
    adopters = any(rep.get("adopted") for rep in reports)
    return {"ok": True, "manifest": manifest.to_bytes().decode() if manifest and adopters else None}, manifest, None


def _meta(request: CommitRequest) -> dict[str, Any]:
    return {
        "tensors": {s.key: [s.dtype, list(s.global_shape)] for s in request.payload.shards},
        "aliases": {k: t.to_json() for k, t in request.aliases.items()},
    }


class ShardOrigin(Protocol):
    """What a manifest needs of a shard this process holds: its key, dtype, global shape."""

    @property
    def key(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def global_shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class LocalRank:
    """One rank's part of a manifest, as this process holds it: its records, the shards
    they answer (in record order) and its aliases."""

    records: RankRecords
    shards: Sequence[ShardOrigin]
    aliases: Mapping[str, TensorRecord]


def build_manifest(
    *,
    step: int,
    run_id: str,
    world_size: int,
    ranks: Sequence[LocalRank | tuple[Any, Mapping[str, Any]]],
    pickled: bool = False,
    user_meta: Mapping[str, Any] | None = None,
) -> Manifest:
    """The manifest of ``step`` from every rank's records: the one place manifests are built
    (the commit protocol's coordinator, and the host tier from its snapshots).

    ``ranks`` holds, per rank in rank order, a :class:`LocalRank` (this process's own) or a
    report from another process: ``(records JSON, meta JSON)`` as :func:`_meta` writes it,
    parsed as hostile input.
    """
    tensors: dict[str, TensorRecord] = {}
    blobs = []
    files: dict[str, int] = {}
    for rank in ranks:
        if isinstance(rank, LocalRank):
            records = rank.records
            for (k, shard), data in zip(records.shards, rank.shards, strict=True):
                if k != data.key:
                    raise RuntimeError(f"the {k!r} record answers shard {data.key!r}: a tier reordered its records")
                prev = tensors.get(k)
                shards = (shard,) if prev is None else prev.shards + (shard,)
                tensors[k] = TensorRecord(k, data.dtype, data.global_shape, shards)
            for k, t in rank.aliases.items():
                tensors.setdefault(k, t)
        else:
            raw, meta = rank
            records = raw if isinstance(raw, RankRecords) else RankRecords.from_json(raw)
            shapes = meta["tensors"]
            for k, shard in records.shards:
                dtype, shape = shapes[k]
                prev = tensors.get(k)
                tensors[k] = TensorRecord(k, dtype, tuple(shape), (prev.shards if prev else ()) + (shard,))
            for k, t in meta["aliases"].items():
                tensors.setdefault(k, TensorRecord.from_json(k, t))
        blobs.append(records.blob)
        files.update(records.files)
    return Manifest(
        step=step,
        run_id=run_id,
        world_size=world_size,
        tensors=dict(sorted(tensors.items())),
        blobs=tuple(sorted(blobs, key=lambda b: b.rank)),
        files=files,
        pickled=pickled,
        user_meta=dict(user_meta or {}),
    )


def _manifest(request: CommitRequest, reports: list[dict[str, Any]], world_size: int) -> Manifest:
    ranks: list[LocalRank | tuple[Any, Mapping[str, Any]]] = []
    for rep in reports:
        records, meta = rep["records"], rep["meta"]
        if isinstance(meta, CommitRequest):  # this process's own report (a world of one)
            ranks.append(LocalRank(records, meta.payload.shards, meta.aliases))
        else:
            ranks.append((records, meta))
    return build_manifest(
        step=request.step, run_id=request.run_id, world_size=world_size, ranks=ranks, pickled=request.pickled,
        user_meta=request.user_meta,
    )


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
