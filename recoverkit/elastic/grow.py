"""Give a newcomer its state: disjoint pieces spread over the survivors, verified on arrival.

Where it sits: right after :func:`~recoverkit.elastic.admit.admit` formed a generation that
admitted joiners, :class:`~recoverkit.elastic.trainer.ElasticTrainer` calls
:func:`transfer` on every rank of it: the survivors (members of the previous generation)
send, the newcomers receive model, optimizer and trainer position (a data-parallel model is
replicated: every survivor holds the same bytes). Reconcile's packing is reused (typed-JSON
skeleton, tensor table, one aligned payload).

The flow (every rank of the new group; every wait bounded by ``timeout_s`` and cut short by
``abort``, the heartbeat)::

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

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.global_grad import wait_collective
from ..distributed.regroup import MAX_WORLD
from ..errors import IntegrityError, RecoverkitError, RegroupError
from ..format.checksum import crc32c, hexcrc
from ..state.codec import decode, encode
from ..state.flatten import unflatten
from ..state.stateful import apply
from .reconcile import HEADER_MAX_BYTES, _pack_doc, _plan, _tensors

__all__ = ["Grow", "Transferred", "transfer"]

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
