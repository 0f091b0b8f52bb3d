"""Fetching snapshot bytes from the ranks that hold them: a plan of disjoint rank-to-rank sends.

Where it sits: below the memory restore (``recovery/memory.py``), which knows what each rank
needs of each owner rank's snapshot and which ranks can serve it; above the peer transport
(``distributed/transport.py``), which moves one buffer per peer and direction, sized by the
receiver and CRC-checked in transit. It moves opaque byte ranges; what they hold is verified
against the snapshot's own CRCs by the layer that asked for them.

::

    needs (receiver -> owner -> byte range)  +  holders (owner -> ranks that can send it)
        -> plan_transfers: one Transfer per (receiver, owner), the sender with the fewest
           bytes assigned so far (the load spread over every holder)
        -> rounds: the k-th transfer of each (sender, receiver) pair in round k, so one
           exchange call moves at most one buffer per peer and direction
        -> run_transfers: every rank takes part in the rounds it has a transfer in, in order;
           with ``check``, one verified pass: the sender computes no CRC (the bytes are
           snapshot regions whose CRCs the receiver holds in its validated records) and the
           receiver checks each region as the transfer lands (``check(t, landed)``)

A plan made by one rank reaches the others as JSON: :meth:`Transfer.from_json` parses it as
hostile input (exact fields, integers in range), and a receiver only ever writes into the
buffer its ``sink`` sized from what *it* validated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError, TransportError, add_note

if TYPE_CHECKING:  # types only: planning and parsing a plan need no torch
    from .transport import Buffer, Check, PeerTransport

__all__ = ["Transfer", "plan_transfers", "rounds", "run_transfers"]

_LIMIT = 1 << 62  # offsets and sizes: far beyond any real snapshot, far from overflowing


@dataclass(frozen=True, order=True)
class Transfer:
    """Bytes ``[offset, offset + nbytes)`` of owner rank ``owner``'s snapshot, sent by rank
    ``src`` (which holds a copy) to rank ``dst``.

    Example:
        >>> t = Transfer(owner=2, src=0, dst=3, offset=4096, nbytes=100)
        >>> Transfer.from_json(t.to_json(), world_size=4) == t
        True
    """

    owner: int
    src: int
    dst: int
    offset: int
    nbytes: int

    def to_json(self) -> list[int]:
        return [self.owner, self.src, self.dst, self.offset, self.nbytes]

    @classmethod
    def from_json(cls, d: Any, *, world_size: int, owners: int | None = None) -> Transfer:
        """Parse strictly: five integers, sender and receiver inside the world of
        ``world_size``, the owner one of ``owners`` ranks (default: the world's; the
        snapshot's world when it differs, after a shrink or a grow), a sender that is not
        the receiver, a range that cannot overflow (else IntegrityError).

        Example:
            >>> Transfer.from_json([3, 0, 2, 0, 8], world_size=3, owners=4)  # a shrink 4 -> 3
            Transfer(owner=3, src=0, dst=2, offset=0, nbytes=8)
        """
        if type(d) is not list or len(d) != 5 or any(type(x) is not int for x in d):
            raise IntegrityError(f"a transfer is five integers, got {str(d)[:80]}")
        owner, src, dst, offset, nbytes = d
        n_owners = world_size if owners is None else owners
        if not (0 <= owner < n_owners and all(0 <= r < world_size for r in (src, dst))) or src == dst:
            raise IntegrityError(
                f"transfer {d}: owner outside the {n_owners} owner(s), ranks outside the world of {world_size}, "
                "or to itself"
            )
        if not (0 <= offset < _LIMIT and 0 <= nbytes < _LIMIT):
            raise IntegrityError(f"transfer {d}: byte range out of range")
        return cls(owner, src, dst, offset, nbytes)


def plan_transfers(
    needs: Mapping[int, Mapping[int, tuple[int, int]]],
    holders: Mapping[int, Sequence[int]],
) -> list[Transfer]:
    """One transfer per (receiver, owner) in ``needs``, each from one of the owner's holders.

    Args:
        needs: receiver rank -> owner rank -> ``(offset, nbytes)`` it must fetch.
        holders: owner rank -> ranks that can send that owner's bytes (on a node holding a
            verified copy), in order of preference.

    The sender of each transfer is the holder with the fewest bytes assigned so far (ties:
    the first in ``holders`` order), so the load spreads over every holder. Deterministic:
    the same inputs give the same plan on every rank. Raises ValueError when an owner has no
    holder other than the receiver itself.

    Example:
        >>> plan_transfers({2: {0: (0, 10)}, 3: {0: (0, 10)}}, {0: [0, 1]})
        [Transfer(owner=0, src=0, dst=2, offset=0, nbytes=10), Transfer(owner=0, src=1, dst=3, offset=0, nbytes=10)]
    """
    load: dict[int, int] = {}
    out: list[Transfer] = []
    for dst in sorted(needs):
        for owner in sorted(needs[dst]):
            offset, nbytes = needs[dst][owner]
            candidates = [r for r in holders.get(owner, ()) if r != dst]
            if not candidates:
                raise ValueError(f"no rank can send owner {owner}'s snapshot to rank {dst}")
            src = min(candidates, key=lambda r: (load.get(r, 0), candidates.index(r)))
            load[src] = load.get(src, 0) + nbytes
            out.append(Transfer(owner, src, dst, offset, nbytes))
    return out


def rounds(transfers: Iterable[Transfer]) -> list[list[Transfer]]:
    """The transfers in rounds: the k-th transfer between a (sender, receiver) pair in round
    k (each exchange call moves at most one buffer per peer and direction); all others of a
    round run at once.

    Example:
        >>> a, b = Transfer(0, 1, 2, 0, 5), Transfer(3, 1, 2, 0, 5)
        >>> rounds([a, b]) == [[a], [b]]
        True
    """
    seen: dict[tuple[int, int], int] = {}
    out: list[list[Transfer]] = []
    for t in sorted(transfers):
        k = seen.get((t.src, t.dst), 0)
        seen[(t.src, t.dst)] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(t)
    return out


def run_transfers(
    transport: PeerTransport,
    transfers: Iterable[Transfer],
    *,
    source: Callable[[Transfer], Buffer],
    sink: Callable[[Transfer], Buffer],
    timeout_s: float,
    check: Callable[[Transfer, memoryview], None] | None = None,
) -> int:
    """Run this rank's part of ``transfers`` (every rank calls it with the same plan).

    ``source(t)`` gives the bytes this rank sends for ``t`` (exactly ``t.nbytes``);
    ``sink(t)`` the buffer it receives ``t`` into, sized by this rank (the transport refuses
    an announced size that differs). The whole call is bounded by ``timeout_s``. Returns the
    bytes received. A transfer that arrives corrupt (or is refused) does not stop the rounds
    after it, so the peers are not left waiting; the first fault is raised at the end with the
    others as notes. A lost or stuck peer raises at once (the transport is broken then).

    ``check(t, landed)``: every rank passes one or none. Given, the bytes move without a CRC
    of the whole buffer (:class:`~recoverkit.distributed.transport.Unsigned`): the receiver
    verifies ``landed`` (``t``'s bytes, once they arrived) against its own records, raising
    IntegrityError naming the region that fails, and that is the transfer's only pass over
    them.

    Example (every rank of the plan)::

        run_transfers(transport, plan, source=lambda t: view[t.offset:t.offset + t.nbytes],
                      sink=lambda t: buffers[t.owner][t.offset:t.offset + t.nbytes], timeout_s=60)
    """
    rank = transport.rank
    deadline = time.monotonic() + timeout_s
    received = 0
    faults: list[BaseException] = []
    if check is not None:
        from .transport import Unsigned
    for batch in rounds(transfers):
        sends: dict[int, Any] = {t.dst: source(t) for t in batch if t.src == rank}
        recvs = {t.src: sink(t) for t in batch if t.dst == rank}
        if not sends and not recvs:
            continue
        checks = None
        if check is not None:
            sends = {p: Unsigned(b) for p, b in sends.items()}
            checks = {t.src: _bound(check, t) for t in batch if t.dst == rank}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError(f"rank {rank}: no time left for the transfers of a restore")
        try:
            got = transport.exchange(sends, recvs, exact=True, timeout_s=remaining, checks=checks)
        except IntegrityError as e:  # refused or corrupt: both ends know; the transport works on
            faults.append(e)
            continue
        received += sum(got.values())
    if faults:
        for other in faults[1:]:
            add_note(faults[0], str(other))
        raise faults[0]
    return received



def _bound(check: Callable[[Transfer, memoryview], None], t: Transfer) -> Check:
    return lambda landed: check(t, landed)
