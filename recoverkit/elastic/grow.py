"""Grow the world at a step boundary: admit joiners and give them their state, disjoint
pieces spread over the survivors, verified on arrival.

Where it sits: the trainer's side of :mod:`.admit`. :class:`~recoverkit.elastic.trainer.ElasticTrainer`
calls :func:`at_boundary` before every step: it proposes admitting announced joiners at the
next boundary or, at the agreed one, checks the members' positions on the old group (one
all-gather), runs :func:`~recoverkit.elastic.admit.admit` and then :func:`transfer` on every
rank of the new group: the survivors (members of the previous generation) send, the
newcomers receive model, optimizer and trainer position (a data-parallel model is
replicated: every survivor holds the same bytes). A newcomer's trainer calls
:func:`receive` when it is built. A failure after the old group is gone is raised as
:class:`~recoverkit.elastic.waits.Lost`: the trainer's recovery re-forms without the
joiners, as for a lost rank. Each admission leaves a :class:`Grow` record (and a log line).
Reconcile's packing is reused (typed-JSON skeleton, tensor table, one aligned payload).

The transfer, on every rank of the new group, every wait bounded by ``timeout_s`` and cut
short by ``abort`` (the heartbeat)::

    senders = the survivors' ranks, src = the lowest; newcomers = the others
    every sender: capture {model, optimizer, trainer} -> header + payload (reconcile)
    src: the payload cut into len(senders) contiguous pieces, piece i sent by senders[i],
         each with its CRC32C (over src's replica, so a sender whose replica drifted is
         named on arrival), and ``extra`` (the trainer's slots and next launch rank)
    broadcast (header size, payload size) from src       newcomers check the caps
    outcome all-gather
    broadcast the header from src                         newcomers decode it as hostile
         input, validate the tensor table (reconcile._plan) and the piece table (contiguous,
         covering the payload, one piece per sender) before the payload is allocated
    outcome all-gather
    point to point: sender i sends piece i to every newcomer, which receives it into its
         slice of one buffer; then each piece's CRC32C (together: the whole payload), apply
    outcome all-gather

A newcomer that refuses what it got says so in the next all-gather: the senders return its
rank in ``refused`` (the trainer then re-forms without it), the newcomer raises. Nothing is
funnelled through one rank but the header; a survivor sends ``1/len(senders)`` of the state
to each newcomer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..distributed.global_grad import wait_collective
from ..distributed.regroup import MAX_WORLD
from ..errors import IntegrityError, RecoverkitError, RegroupError
from ..format.checksum import crc32c, hexcrc
from ..state.codec import decode, encode
from ..state.flatten import unflatten
from ..state.stateful import apply
from .admit import FormationFailed, Proposal, admit, pending, propose, read_proposal
from .reconcile import HEADER_MAX_BYTES, _pack_doc, _plan, _tensors
from .waits import Lost, reducing

if TYPE_CHECKING:
    from .trainer import ElasticTrainer

log = logging.getLogger("recoverkit")

__all__ = ["Grow", "Transferred", "transfer", "at_boundary", "receive"]

_STATE_KEYS = ("skeleton", "tensors", "nbytes", "crc32c")


@dataclass(frozen=True)
class Grow:
    """One admission of joiners, as this rank saw it (also logged; a newcomer records its own).

    Attributes:
        step, epoch: the data position of the boundary (the next step runs at the new world).
        joined: launch ranks admitted; ``dropped``: proposed ones that did not answer in time.
        generation, world_size: the new membership.
        admit_s: from the boundary to the new group (a newcomer: from its announcement);
            ``admit_phases_s`` its split (``sync``: the old group's all-gather, ``acks``,
            ``teardown``, ``init``).
        transfer_s: the state transfer; ``nbytes`` each newcomer received, ``pieces``
            ``(sender rank, bytes)`` per piece.
        failed: why the transfer failed (the trainer then re-formed without the newcomers,
            see its recoveries), ``None`` when it went through.
    """

    step: int
    epoch: int
    joined: tuple[int, ...]
    dropped: tuple[int, ...]
    generation: int
    world_size: int
    admit_s: float
    admit_phases_s: tuple[tuple[str, float], ...]
    transfer_s: float
    nbytes: int
    pieces: tuple[tuple[int, int], ...]
    failed: str | None = None


@dataclass(frozen=True)
class Transferred:
    """What :func:`transfer` did on this rank.

    Attributes:
        nbytes: payload bytes each newcomer received.
        pieces: ``(sender rank, bytes)`` per piece, in payload order.
        extra: the ``extra`` record src sent (validated on newcomers).
        refused: newcomer ranks that refused the state (senders only; empty on success).
        seconds: the whole transfer here.
    """

    nbytes: int
    pieces: tuple[tuple[int, int], ...]
    extra: dict[str, Any]
    refused: tuple[int, ...] = ()
    seconds: float = 0.0


def _split(nbytes: int, senders: list[int]) -> list[tuple[int, int, int]]:
    """(sender, offset, length): contiguous, in sender order, sizes differing by at most one."""
    n = len(senders)
    return [
        (s, i * nbytes // n, (i + 1) * nbytes // n - i * nbytes // n) for i, s in enumerate(senders)
    ]


def _pieces(value: Any, nbytes: int, senders: list[int]) -> list[tuple[int, int, int, int]]:
    """Validates src's piece table: ``[[sender, offset, length, crc], ...]`` covering the payload."""
    if not isinstance(value, list) or len(value) != len(senders):
        raise IntegrityError(f"grow: the piece table is not a list of {len(senders)} pieces")
    out = []
    offset = 0
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != 4 or any(type(v) is not int for v in row):
            raise IntegrityError(f"grow: piece {i} is not [sender, offset, length, crc32c]")
        sender, off, length, crc = row
        if (
            sender != senders[i]
            or off != offset
            or not 0 <= length <= nbytes - off
            or not 0 <= crc < 2**32
        ):
            raise IntegrityError(
                f"grow: piece {i} {row} does not follow on at {offset} from sender {senders[i]} within {nbytes} bytes"
            )
        out.append((sender, off, length, crc))
        offset += length
    if offset != nbytes:
        raise IntegrityError(f"grow: the pieces cover {offset} bytes of {nbytes}")
    return out


def _extra(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"slots", "next_launch_rank"}:
        raise IntegrityError(
            f"grow: the extra record is not {{slots, next_launch_rank}}: {str(value)[:80]}"
        )
    slots, nxt = value["slots"], value["next_launch_rank"]
    if (
        not isinstance(slots, list)
        or not 0 < len(slots) <= MAX_WORLD
        or any(type(r) is not int or not 0 <= r < MAX_WORLD for r in slots)
        or len(set(slots)) != len(slots)
        or type(nxt) is not int
        or not 0 <= nxt <= MAX_WORLD
    ):
        raise IntegrityError(f"grow: malformed slots or next launch rank: {str(value)[:80]}")
    return {"slots": list(slots), "next_launch_rank": nxt}


def transfer(
    state: Mapping[str, Any],
    *,
    newcomers: tuple[int, ...],
    extra: dict[str, Any],
    max_bytes: int,
    timeout_s: float,
    abort: Callable[[], str | None] | None = None,
    poll_s: float = 0.05,
) -> Transferred:
    """Sends ``state`` from the survivors to the ``newcomers`` (ranks of the new default group).

    Collective over the default group: every rank calls it with the same ``newcomers``.
    Survivors' ``state`` is read, newcomers' ``state`` is overwritten (all or nothing).

    Args:
        state: ``{"model": ..., "optimizer": ..., "trainer": ...}``.
        newcomers: the ranks that receive (not empty, not all).
        extra: src's ``{"slots": [...], "next_launch_rank": n}`` (others pass theirs; ignored).
        max_bytes: the most payload bytes a newcomer accepts.
        timeout_s: bound on every wait; ``abort``/``poll_s``: the heartbeat's verdict,
            asked while a wait is pending.

    Raises:
        IntegrityError (newcomer): what it received was malformed or failed its CRC32C.
        RegroupError (newcomer): another newcomer refused (``reason="diverged"``).
        RuntimeError / PeerLostError / PeerTimeoutError: a collective failed or was given up.
    """
    start = time.monotonic()
    rank, world = dist.get_rank(), dist.get_world_size()
    senders = [r for r in range(world) if r not in newcomers]
    if not newcomers or not senders or not set(newcomers) <= set(range(world)):
        raise ValueError(f"grow: newcomers {list(newcomers)} of a world of {world}")
    src, receiving = senders[0], rank in newcomers

    def wait(work: Any, what: str) -> None:
        wait_collective(work, f"grow: {what}", timeout_s=timeout_s, abort=abort, poll_s=poll_s)

    def outcome(error: BaseException | None, what: str) -> list[int]:
        mine = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        out = [torch.zeros_like(mine) for _ in range(world)]
        wait(dist.all_gather(out, mine, async_op=True), f"the outcome all-gather after {what}")
        return [i for i, t in enumerate(out) if int(t.item())]

    header, payload = b"", torch.empty(0, dtype=torch.uint8)
    if not receiving:
        doc, payload = _pack_doc(state, checksum=False)  # the pieces carry the checksums
        if rank == src:
            table = _split(payload.numel(), senders)
            doc["pieces"] = [
                [s, off, n, crc32c(payload[off : off + n].numpy()) if n else 0]
                for s, off, n in table
            ]
            doc["extra"] = extra
            header = encode(doc)
    sizes = torch.tensor([len(header), payload.numel()], dtype=torch.int64)
    wait(dist.broadcast(sizes, src, async_op=True), "the size broadcast")
    n, nbytes = (int(v) for v in sizes.tolist())
    error: BaseException | None = None
    limit = min(HEADER_MAX_BYTES, max_bytes)
    if receiving and not (0 < n <= limit and 0 <= nbytes <= max_bytes):
        error = IntegrityError(
            f"grow: rank {src} announced a {n}-byte header and a {nbytes}-byte payload; "
            f"accepted: 1..{limit} and 0..{max_bytes}"
        )

    def settle(what: str) -> tuple[int, ...] | None:
        """None: every rank went on; else the refusing ranks (senders return them, newcomers raise)."""
        failed = outcome(error, what)
        if not failed:
            return None
        if receiving:
            if error is not None:
                raise error
            raise RegroupError(
                f"grow: newcomer rank(s) {failed} refused the state at {what}", reason="diverged"
            )
        return tuple(failed)

    def refused(failed: tuple[int, ...]) -> Transferred:
        return Transferred(nbytes, (), extra, refused=failed, seconds=time.monotonic() - start)

    if (failed := settle("the size broadcast")) is not None:
        return refused(failed)
    buf = (
        torch.frombuffer(bytearray(header), dtype=torch.uint8)
        if rank == src
        else torch.empty(max(n, 0), dtype=torch.uint8)
    )
    wait(dist.broadcast(buf, src, async_op=True), "the header broadcast")
    plan: Any = None
    pieces: list[tuple[int, int, int, int]] = []
    got_extra = extra
    if receiving:
        try:
            doc = decode(buf.numpy().tobytes())
            if not isinstance(doc, dict) or set(doc) != {*_STATE_KEYS, "pieces", "extra"}:
                raise IntegrityError(
                    f"grow: the header is not a grow record ({type(doc).__name__})"
                )
            plan = _plan({k: doc[k] for k in _STATE_KEYS}, nbytes)
            if plan[2] != nbytes:
                raise IntegrityError(
                    f"grow: the header describes {plan[2]} payload bytes; {nbytes} were announced"
                )
            pieces = _pieces(doc["pieces"], nbytes, senders)
            got_extra = _extra(doc["extra"])
        except RecoverkitError as e:  # decode, _plan and the checks raise IntegrityError only
            error = e
    if (failed := settle("the header")) is not None:
        return refused(failed)
    if receiving:
        payload = torch.empty(nbytes, dtype=torch.uint8)  # validated: within max_bytes
    else:
        pieces = [(s, off, length, 0) for s, off, length in _split(nbytes, senders)]
    works = []
    for sender, off, length, _ in pieces:
        if not length:
            continue
        if receiving:
            works.append((sender, dist.irecv(payload[off : off + length], src=sender)))
        elif sender == rank:
            works.extend((r, dist.isend(payload[off : off + length], dst=r)) for r in newcomers)
    for peer, work in works:
        wait(work, f"the piece {'from' if receiving else 'to'} rank {peer}")
    if receiving:
        try:
            for sender, off, length, crc in pieces:
                got = crc32c(payload[off : off + length].numpy()) if length else 0
                if got != crc:
                    raise IntegrityError(
                        f"grow: the piece from rank {sender} ({length} bytes at {off}) arrived with "
                        f"CRC32C {hexcrc(got)}, src {src} computed {hexcrc(crc)}: the replicas differ or it was damaged"
                    )
            skeleton, entries, _, _ = plan  # the pieces cover the payload: each one was checked
            apply(dict(state), unflatten(skeleton, _tensors(entries, payload)))
        except Exception as e:  # noqa: BLE001 - any refusal must reach every rank, not strand them
            error = e
    if (failed := settle("applying the state")) is not None:
        return refused(failed)
    return Transferred(
        nbytes=nbytes,
        pieces=tuple((s, length) for s, _, length, _ in pieces),
        extra=got_extra,
        seconds=time.monotonic() - start,
    )

# ---------------------------------------------------------------------- the trainer's side


def at_boundary(trainer: ElasticTrainer) -> Grow | None:
    """At a step boundary: admit the joiners proposed for it, or propose the next boundary
    for joiners that announced themselves (one or two store calls when nobody joins)."""
    if trainer.store is None or trainer._rebuild is not None:
        return None  # no store (a test's world), or a sharded model: grow is for replicated ones
    m = trainer.membership
    proposal = read_proposal(trainer.store, m)
    if proposal is None:
        try:
            joiners, nxt, refused = pending(
                trainer.store,
                m,
                trainer._scan_from,
                trainer._first_seen,
                patience_s=trainer.options.admit_timeout_s,
            )
        except RegroupError as e:  # a malformed counter: no admission, training goes on
            if e.reason != "invalid":
                raise
            log.warning("elastic: joiners not looked for at step %d: %s", trainer.steps_done, e)
            return None
        if refused:
            log.warning(
                "elastic: joiner launch rank(s) %s refused (malformed or missing record, or withdrawn)",
                refused,
            )
        if joiners:
            agreed = propose(
                trainer.store,
                m,
                Proposal(at=trainer.steps_done + 1, joiners=tuple(joiners), next=nxt),
            )
            log.warning(
                "elastic: launch rank(s) %s to be admitted once %d steps are done",
                list(agreed.joiners),
                agreed.at,
            )
        else:
            trainer._scan_from = nxt  # refused ones are not looked at again
        return None
    if proposal.at > trainer.steps_done:
        return None
    if proposal.at < trainer.steps_done:
        raise RegroupError(
            f"elastic: the admission agreed for step {proposal.at} was missed at step "
            f"{trainer.steps_done}",
            reason="diverged",
        )
    return _admit(trainer, proposal)

def _admit(trainer: ElasticTrainer, proposal: Proposal) -> Grow:
    """Every member at the agreed boundary: check the positions on the old group, admit
    the joiners that answer, send them their state (a failure: :class:`Lost`)."""
    o, old = trainer.options, trainer.membership
    start = time.monotonic()
    mine = torch.tensor(
        [trainer.steps_done, trainer.sampler.epoch, trainer.sampler.step, old.generation],
        dtype=torch.int64,
    )
    rows = [torch.zeros_like(mine) for _ in range(old.world_size)]
    with reducing("grow: the boundary all-gather"):
        wait_collective(
            dist.all_gather(rows, mine, async_op=True),
            "grow: the boundary all-gather",
            **trainer._wait_kw(),
        )
    if any(not torch.equal(r, mine) for r in rows):
        raise RegroupError(
            f"elastic: members reached the admission boundary at different positions "
            f"{[r.tolist() for r in rows][:16]}",
            reason="diverged",
        )
    synced = time.monotonic()
    trainer._next_launch_rank = proposal.next
    trainer._scan_from = max(trainer._scan_from, proposal.next)
    try:
        adm = admit(
            trainer.store,
            old,
            proposal,
            form_timeout_s=o.admit_timeout_s,
            pg_timeout_s=o.pg_timeout_s,
            heartbeat=trainer.heartbeat,
        )
    except FormationFailed as e:  # the old group is gone: re-form from the old members
        trainer.ddp = None
        trainer.membership = e.fallback
        failed = time.monotonic() - start
        trainer.grows.append(Grow(
            step=trainer.sampler.step, epoch=trainer.sampler.epoch, joined=(), dropped=proposal.joiners,
            generation=e.fallback.generation, world_size=e.fallback.world_size, admit_s=failed,
            admit_phases_s=(("sync", synced - start),), transfer_s=0.0, nbytes=0, pieces=(), failed=str(e)[:500],
        ))
        log.warning("elastic: admitting launch rank(s) %s failed after %.3f s: %s", list(proposal.joiners), failed, e)
        raise Lost(f"grow: {e}; the joiners are dropped") from None
    new = trainer.membership = adm.membership
    admitted = time.monotonic()
    nbytes, moved_s = 0, 0.0
    pieces: tuple[tuple[int, int], ...] = ()

    def record(failed: str | None = None) -> Grow:
        grow = Grow(
            step=trainer.sampler.step,
            epoch=trainer.sampler.epoch,
            joined=adm.joined,
            dropped=adm.dropped,
            generation=new.generation,
            world_size=new.world_size,
            admit_s=admitted - start,
            admit_phases_s=(("sync", synced - start), *adm.phases_s),
            transfer_s=moved_s,
            nbytes=nbytes,
            pieces=pieces,
            failed=failed,
        )
        trainer.grows.append(grow)
        return grow

    if adm.joined:
        trainer.ddp = None  # bound to the old group
        slots = list(trainer.launch_members)
        for r in adm.joined:  # mode "shrink": a newcomer takes a lost rank's share, or a new one
            free = [i for i, s in enumerate(slots) if s not in new.members]
            if free:
                slots[free[0]] = r
            else:
                slots.append(r)
        trainer.launch_members = tuple(slots)
        try:
            with reducing("grow: the state transfer"):
                sent = transfer(
                    {"model": trainer.model, "optimizer": trainer.optimizer, "trainer": trainer},
                    newcomers=tuple(new.members.index(r) for r in adm.joined),
                    extra={"slots": slots, "next_launch_rank": proposal.next},
                    max_bytes=trainer._sync_max_bytes(),
                    timeout_s=o.pg_timeout_s,
                    abort=trainer._seen_lost,
                    poll_s=o.poll_s,
                )
            if sent.refused:
                raise Lost(f"grow: newcomer rank(s) {list(sent.refused)} refused the state")
        except Lost as lost:  # recovered like a lost rank: the newcomers are left out
            moved_s = time.monotonic() - admitted
            record(lost.how)
            log.warning(
                "elastic: generation %d at step %d: the state transfer to launch rank(s) %s failed "
                "after %.3f s: %s",
                new.generation,
                trainer.sampler.step,
                list(adm.joined),
                moved_s,
                lost.how,
            )
            raise
        nbytes, pieces, moved_s = sent.nbytes, sent.pieces, sent.seconds
        if trainer._wrap is not None:
            trainer.ddp = trainer._wrap(trainer.model)
    grow = record()
    log.warning(
        "elastic: generation %d at step %d: launch rank(s) %s joined%s, world %d -> %d; admitted in %.3f s (%s), "
        "state sent in %.3f s (%d bytes each, pieces %s)",
        new.generation,
        grow.step,
        list(adm.joined),
        f" ({list(adm.dropped)} dropped)" if adm.dropped else "",
        old.world_size,
        new.world_size,
        grow.admit_s,
        ", ".join(f"{n} {t:.3f} s" for n, t in grow.admit_phases_s),
        moved_s,
        nbytes,
        [f"{b} from rank {r}" for r, b in pieces],
    )
    return grow

def receive(trainer: ElasticTrainer) -> Grow:
    """A newcomer (:func:`~recoverkit.elastic.admit.join`): model, optimizer and position from the survivors."""
    o, m = trainer.options, trainer.membership
    sent = transfer(
        {"model": trainer.model, "optimizer": trainer.optimizer, "trainer": trainer},
        newcomers=tuple(m.members.index(r) for r in m.joined),
        extra={"slots": list(m.members), "next_launch_rank": trainer._next_launch_rank},
        max_bytes=trainer._sync_max_bytes(),
        timeout_s=o.pg_timeout_s,
        abort=trainer._seen_lost,
        poll_s=o.poll_s,
    )
    trainer.launch_members = tuple(sent.extra["slots"])
    trainer._next_launch_rank = trainer._scan_from = sent.extra["next_launch_rank"]
    grow = Grow(
        step=trainer.sampler.step,
        epoch=trainer.sampler.epoch,
        joined=m.joined,
        dropped=(),
        generation=m.generation,
        world_size=m.world_size,
        admit_s=m.formed_in_s,
        admit_phases_s=m.phases_s,
        transfer_s=sent.seconds,
        nbytes=sent.nbytes,
        pieces=sent.pieces,
    )
    log.warning(
        "elastic: launch rank %d joined generation %d at step %d (world %d) in %.3f s; state received in "
        "%.3f s (%d bytes, pieces %s)",
        m.launch_rank,
        m.generation,
        grow.step,
        m.world_size,
        grow.admit_s,
        grow.transfer_s,
        grow.nbytes,
        [f"{b} from rank {r}" for r, b in grow.pieces],
    )
    return grow
