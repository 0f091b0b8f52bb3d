"""Peer transport: bulk bytes between ranks, every transfer sized by the receiver and CRC-checked.

Where it sits: below the recovery strategies and the peer-replica tier (they move snapshot
bytes rank to rank), above the format's checksums. It moves opaque buffers; what they hold
(segments, manifests, blobs) is validated by the layers that read them.

One transfer, in four lock-step phases that every rank of an :meth:`PeerTransport.exchange`
runs in the same order (so ranks that send to each other at once never deadlock):

1. header: the sender announces ``(size, crc32c, sequence number)``;
2. reply: the receiver checks the announced size against the buffer *it* provided (hostile-input
   rule: a sender never sizes an allocation) and its sequence number, and accepts or refuses;
3. payload: only an accepted transfer moves its bytes, straight into the receiver's buffer;
4. acknowledgement: the receiver recomputes the CRC-32C and tells the sender whether it matched.

One verified pass for bytes that carry their own checksums (snapshot regions): the sender
wraps them in :class:`Unsigned` (it computes no CRC; the header says so) and the receiver
passes ``checks[peer]``, which verifies the landed bytes region by region against *its*
records instead of a CRC over the whole buffer. A header without a CRC is refused where the
receiver has no check for it, so no byte is ever taken unverified.

So :meth:`~PeerTransport.send` returns only once the peer holds the bytes verified, a refused
or corrupt transfer raises on both ends (and the transport stays usable for a retry), and a
dead or stuck peer raises :class:`PeerTimeoutError` / :class:`PeerLostError` naming it within
the timeout. After a lost peer the transport is broken (the process group's connection to it
is closed); every later call raises at once, and the caller builds a new one.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import IntegrityError, PeerLostError, PeerTimeoutError, TransportError, add_note
from ..format.checksum import crc32c, hexcrc

__all__ = [
    "Buffer",
    "Check",
    "PeerLostError",
    "PeerTimeoutError",
    "PeerTransport",
    "ProcessGroupTransport",
    "TransportError",
    "Unsigned",
]

#: what a transfer moves: bytes-like objects, or a contiguous tensor (its bytes)
Buffer = bytes | bytearray | memoryview | torch.Tensor

#: the receiver's own verification of bytes that landed (raises IntegrityError naming what
#: is wrong); given for a peer, it replaces the CRC over the whole buffer
Check = Callable[[memoryview], None]

MAGIC = 0x524B5450  # "RKTP": a header that is not one of ours is refused
_HEADER, _REPLY, _PAYLOAD, _ACK = 0x5101, 0x5102, 0x5103, 0x5104  # point-to-point tags per phase
_NO_CRC = -1  # a header's CRC field for bytes the receiver verifies by its records


class Unsigned:
    """Bytes sent without a CRC of their own: the receiver verifies them by its records
    (its ``checks`` for this peer), so the sender reads them once, to send them.

    Example (every region of ``view`` has a CRC in the receiver's validated records)::

        transport.exchange({peer: Unsigned(view)}, None)
    """

    __slots__ = ("data",)

    def __init__(self, data: Buffer) -> None:
        self.data = data


class PeerTransport(ABC):
    """Moves buffers between ranks; the receiver sizes every buffer, every byte is CRC-checked.

    Call order: every rank that takes part calls :meth:`exchange` (or :meth:`send` /
    :meth:`recv_into`, which are one-sided exchanges) with matching peers: rank A lists B in
    ``sends`` exactly when B lists A in ``recvs`` of the same call. A rank may send to and
    receive from many peers in one call (disjoint transfers run at once). Peers are global
    ranks. One thread per transport at a time.
    """

    rank: int

    @abstractmethod
    def exchange(
        self,
        sends: Mapping[int, Buffer] | None = None,
        recvs: Mapping[int, Buffer] | None = None,
        *,
        exact: bool = True,
        timeout_s: float | None = None,
        checks: Mapping[int, Check] | None = None,
    ) -> dict[int, int]:
        """Send each ``sends[peer]`` to its peer and receive from each peer into ``recvs[peer]``.

        A receive buffer is writable and sized by the caller: the peer's announced size must
        equal its length (``exact``) or not exceed it, else the transfer is refused before any
        byte moves. A send wrapped in :class:`Unsigned` carries no CRC; its receiver must give
        ``checks[peer]`` (its own verification of the landed bytes, which then replaces the
        CRC over the whole buffer), else it refuses the transfer. Returns the number of bytes
        received from each peer. Raises
        IntegrityError (a refused size, a CRC mismatch, a transfer out of sequence: both ends
        raise, naming the peer), PeerLostError / PeerTimeoutError (a dead or stuck peer, within
        ``timeout_s``). Several failures raise the first, the others as notes.
        """

    def send(self, peer: int, data: Buffer, *, timeout_s: float | None = None) -> None:
        """Send ``data`` to ``peer``; returns once the peer verified every byte.

        Example (rank 0 of a 2-rank world; rank 1 calls ``recv_into(0, buf)``):
            >>> transport.send(1, b"state bytes")  # doctest: +SKIP
        """
        self.exchange({peer: data}, None, timeout_s=timeout_s)

    def recv_into(
        self, peer: int, out: Buffer, *, exact: bool = True, timeout_s: float | None = None
    ) -> int:
        """Receive from ``peer`` into ``out`` (its length is the size expected, or the limit
        when ``exact=False``); returns the number of bytes received, verified.

        Example (rank 1; rank 0 calls ``send(1, b"state bytes")``):
            >>> buf = bytearray(11)
            >>> transport.recv_into(0, buf)  # doctest: +SKIP
            11
        """
        return self.exchange(None, {peer: out}, exact=exact, timeout_s=timeout_s)[peer]

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the transport holds (idempotent)."""


def _bytes_view(buf: Buffer, *, writable: bool, what: str) -> torch.Tensor:
    """A flat uint8 tensor over ``buf``'s memory (no copy)."""
    if isinstance(buf, torch.Tensor):
        if not buf.is_contiguous():
            raise TypeError(f"{what}: a tensor buffer must be contiguous")
        flat = buf.detach().reshape(-1)
        return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise TypeError(f"{what}: a buffer must be C-contiguous")
    if writable and mv.readonly:
        raise TypeError(f"{what}: a receive buffer must be writable ({type(buf).__name__} is not)")
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only sources (bytes) are only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv.cast("B"), dtype=torch.uint8)


def _host_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a uint8 tensor's memory (device tensors copied to the host)."""
    host = t if t.device.type == "cpu" else t.cpu()
    return memoryview(host.numpy()).cast("B") if host.numel() else memoryview(b"")  # type: ignore[arg-type]


def _crc(t: torch.Tensor) -> int:
    """CRC-32C of a uint8 tensor's bytes (device tensors are copied to the host first)."""
    host = t if t.device.type == "cpu" else t.cpu()
    return crc32c(host.numpy()) if host.numel() else 0


class ProcessGroupTransport(PeerTransport):
    """:class:`PeerTransport` over torch.distributed point-to-point ops on a group of its own.

    Args:
        group: the process group to use; by default a new one over every rank (created with
            ``new_group``, so every rank of the default group constructs the transport
            together, and its traffic never queues behind training collectives).
        backend: the new group's backend (default: ``"nccl"`` when CUDA is available, else
            ``"gloo"``). With NCCL, buffers on the host are staged through the current device.
        timeout_s: the default bound on every call (and the new group's own timeout).
        on_arrival: test seam, ``on_arrival(peer, payload)`` with the received bytes (a uint8
            tensor, in place) before their CRC is checked: tests corrupt a transfer here.

    Example (every rank):
        >>> transport = ProcessGroupTransport(timeout_s=30)  # doctest: +SKIP
        >>> got = transport.exchange({(rank + 1) % world: payload},
        ...                          {(rank - 1) % world: bytearray(size)})  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        group: Any = None,
        backend: str | None = None,
        timeout_s: float = 60.0,
        on_arrival: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (got {timeout_s})")
        self._owned = group is None
        if group is None:
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        self.group = group
        self.rank = dist.get_rank()
        self.timeout_s = timeout_s
        self._on_arrival = on_arrival
        cuda = dist.get_backend(group) == "nccl"
        self._device = (
            torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        )
        self._sent: dict[int, int] = {}  # peer -> transfers sent (sequence numbers)
        self._received: dict[int, int] = {}
        self._lost: dict[int, str] = {}  # peer -> how it was lost (its connection is closed)
        self._broken: str | None = None  # the whole transport (a timeout, or closed)

    # ------------------------------------------------------------------ the protocol
    def exchange(
        self,
        sends: Mapping[int, Buffer] | None = None,
        recvs: Mapping[int, Buffer] | None = None,
        *,
        exact: bool = True,
        timeout_s: float | None = None,
        checks: Mapping[int, Check] | None = None,
    ) -> dict[int, int]:
        if self._broken is not None:
            raise TransportError(
                f"rank {self.rank}: the transport is broken ({self._broken}); build a new one"
            )
        sends, recvs, checks = dict(sends or {}), dict(recvs or {}), dict(checks or {})
        for peer in (*sends, *recvs):
            if peer == self.rank or not 0 <= peer < dist.get_world_size():
                raise ValueError(f"rank {self.rank}: {peer} is not a peer")
            if peer in self._lost:
                raise PeerLostError(
                    f"rank {self.rank}: rank {peer} is gone ({self._lost[peer]})", peer=peer
                )
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        out = {
            p: _bytes_view(b, writable=True, what=f"receive from rank {p}")
            for p, b in recvs.items()
        }
        unsigned = {p for p, b in sends.items() if isinstance(b, Unsigned)}
        src = {
            p: _bytes_view(b.data if isinstance(b, Unsigned) else b, writable=False, what=f"send to rank {p}")
            for p, b in sends.items()
        }
        faults: list[BaseException] = []
        # A peer lost in one phase leaves the later ones; the transfers with the others complete.

        # 1. headers: (magic, sequence, size, crc) each way
        hdrs = {
            p: self._ints(MAGIC, self._sent.get(p, 0), t.numel(), _NO_CRC if p in unsigned else _crc(t))
            for p, t in src.items()
        }
        got_hdr = {p: self._ints(0, 0, 0, 0) for p in out}
        self._phase("header", _HEADER, hdrs, got_hdr, deadline, faults)
        for p in src:
            self._sent[p] = self._sent.get(p, 0) + 1
        announced: dict[int, tuple[int, int]] = {}  # peer -> (size, crc) accepted
        for p, hdr in got_hdr.items():
            self._received[p] = (expected_seq := self._received.get(p, 0)) + 1
            if p in self._lost:
                continue
            magic, seq, size, crc = (int(v) for v in hdr.tolist())
            limit = out[p].numel()
            if magic != MAGIC or seq != expected_seq:
                why = f"is not in step (header {magic:#x} #{seq}, expected #{expected_seq})"
                faults.append(IntegrityError(f"rank {self.rank}: the transfer from rank {p} {why}"))
            elif crc != _NO_CRC and not 0 <= crc <= 0xFFFFFFFF:
                faults.append(IntegrityError(f"rank {self.rank}: rank {p} announced CRC {crc}: refused"))
            elif crc == _NO_CRC and p not in checks:
                faults.append(
                    IntegrityError(
                        f"rank {self.rank}: rank {p} sent {size} bytes without a CRC, and this "
                        f"receive has no records to verify them by: refused"
                    )
                )
            elif size < 0 or size > limit or (exact and size != limit):
                takes = f"{'exactly' if exact else 'at most'} {limit}"
                faults.append(
                    IntegrityError(
                        f"rank {self.rank}: rank {p} announced {size} bytes, the receive "
                        f"buffer takes {takes}: refused"
                    )
                )
            else:
                announced[p] = (size, crc)

        # 2. replies: accepted or refused, and the receiver's limit
        replies = {
            p: self._ints(int(p in announced), out[p].numel()) for p in out if p not in self._lost
        }
        got_reply = {p: self._ints(0, 0) for p in src if p not in self._lost}
        self._phase("reply", _REPLY, replies, got_reply, deadline, faults)
        accepted = []
        for p, reply in got_reply.items():
            if p in self._lost:
                continue
            ok, limit = (int(v) for v in reply.tolist())
            if ok:
                accepted.append(p)
            else:
                faults.append(
                    IntegrityError(
                        f"rank {self.rank}: rank {p} refused {src[p].numel()} bytes "
                        f"(its buffer takes {limit})"
                    )
                )
        announced = {p: a for p, a in announced.items() if p not in self._lost}

        # 3. payloads, straight into the receiver's buffer (at most its length)
        payload_in = {p: out[p][:size] for p, (size, _) in announced.items() if size}
        staged_in = {p: self._on_device(t, copy=False) for p, t in payload_in.items()}
        payload_out = {p: self._on_device(src[p], copy=True) for p in accepted if src[p].numel()}
        self._phase("payload", _PAYLOAD, payload_out, staged_in, deadline, faults)
        verified: dict[int, int] = {}
        for p, (size, crc) in announced.items():
            if p in self._lost:
                continue
            view = payload_in.get(p, out[p][:0])
            if p in staged_in and staged_in[p] is not view:
                view.copy_(staged_in[p])
            if self._on_arrival is not None:
                self._on_arrival(p, view)
            check = checks.get(p)
            if check is not None:  # one pass: the receiver's records, region by region
                try:
                    check(_host_bytes(view))
                except IntegrityError as e:
                    faults.append(e)
                else:
                    verified[p] = size
                continue
            found = _crc(view)
            if found != crc:
                faults.append(
                    IntegrityError(
                        f"rank {self.rank}: {size} bytes from rank {p} fail their CRC-32C "
                        f"(sent {hexcrc(crc)}, arrived {hexcrc(found)})"
                    )
                )
            else:
                verified[p] = size

        # 4. acknowledgements: the sender learns whether its bytes arrived intact
        acks = {p: self._ints(int(p in verified)) for p in announced if p not in self._lost}
        got_ack = {p: self._ints(0) for p in accepted if p not in self._lost}
        self._phase("acknowledgement", _ACK, acks, got_ack, deadline, faults)
        for p, ack in got_ack.items():
            if p not in self._lost and not int(ack.item()):
                faults.append(
                    IntegrityError(
                        f"rank {self.rank}: rank {p} received {src[p].numel()} bytes that "
                        f"failed {'its check' if p in unsigned else 'their CRC-32C check'}"
                    )
                )
        if faults:
            for other in faults[1:]:
                add_note(faults[0], str(other))
            raise faults[0]
        return verified

    # ------------------------------------------------------------------ helpers
    def _ints(self, *values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self._device)

    def _on_device(self, t: torch.Tensor, *, copy: bool) -> torch.Tensor:
        """``t`` where the backend can move it (NCCL: the device; a receive buffer is staged)."""
        if t.device == self._device:
            return t
        return (
            t.to(self._device)
            if copy
            else torch.empty(t.numel(), dtype=torch.uint8, device=self._device)
        )

    def _phase(
        self,
        what: str,
        tag: int,
        sends: Mapping[int, torch.Tensor],
        recvs: Mapping[int, torch.Tensor],
        deadline: float,
        faults: list[BaseException],
    ) -> None:
        """Post every send and receive of one phase, then wait for each, bounded.

        A peer whose connection closed is recorded as lost (its error added to ``faults``) and
        the others are still waited for; a timeout raises at once and breaks the transport.
        """
        ops: list[tuple[int, Callable[..., Any], torch.Tensor]] = [
            (p, dist.isend, t) for p, t in sends.items()
        ]
        ops += [(p, dist.irecv, t) for p, t in recvs.items()]
        ops = [(p, op, t) for p, op, t in ops if p not in self._lost]
        if not ops:
            return
        waits: list[tuple[int, Any]] = []
        if (
            self._device.type == "cuda"
        ):  # NCCL: one group of calls, or ranks sending to each other deadlock
            works = dist.batch_isend_irecv(
                [dist.P2POp(op, t, p, self.group, tag) for p, op, t in ops]
            )
            peers = [p for p, _, _ in ops] if len(works) == len(ops) else [ops[0][0]] * len(works)
            waits = list(zip(peers, works))
        else:  # gloo: posted one by one, so a refusal to post names its peer
            for p, op, t in ops:
                try:
                    waits.append((p, op(t, p, self.group, tag)))
                except RuntimeError as e:
                    self._lose(p, what, deadline, e, faults)
        for p, work in waits:
            if p not in self._lost:
                self._wait(work, p, what, deadline, faults)

    def _wait(
        self, work: Any, peer: int, what: str, deadline: float, faults: list[BaseException]
    ) -> None:
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no time left")
            if self._device.type == "cuda":  # an NCCL wait only orders streams: poll the host side
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError("not completed")
                    time.sleep(0.0005)
                work.wait()
            elif work.wait(timeout=timedelta(seconds=remaining)) is False:
                raise TimeoutError("not completed")
        except (RuntimeError, TimeoutError) as e:
            self._lose(peer, what, deadline, e, faults)

    def _lose(
        self,
        peer: int,
        what: str,
        deadline: float,
        error: BaseException,
        faults: list[BaseException],
    ) -> None:
        """Record a failed wait on ``peer``: a closed connection loses the peer (added to
        ``faults``); a timeout breaks the transport and raises now (the time is spent)."""
        text = str(error)
        timed_out = (
            isinstance(error, TimeoutError)
            or time.monotonic() >= deadline
            or "timed out" in text.lower()
        )
        if timed_out:
            self._broken = f"rank {peer} timed out during the {what}"
            raise PeerTimeoutError(
                f"rank {self.rank}: rank {peer} did not complete the {what} of a transfer "
                f"within the timeout (dead or stuck): {text}",
                peer=peer,
            ) from error
        self._lost[peer] = f"lost during the {what}: {text}"
        faults.append(
            PeerLostError(
                f"rank {self.rank}: rank {peer} was lost during the {what} of a transfer: {text}",
                peer=peer,
            )
        )

    def close(self) -> None:
        """Destroy the group this transport created (not one it was given); idempotent."""
        if self._owned and self.group is not None and self._broken is None and not self._lost:
            dist.destroy_process_group(self.group)
        self.group = None
        self._broken = self._broken or "closed"
