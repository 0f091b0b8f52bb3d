"""The peer transport in real gloo worlds: bit-exact transfers, corruption, refusals, dead peers.

Faults are real: a corrupted receive buffer (through the transport's ``on_arrival`` seam,
before the CRC check), an oversized announcement, a peer that SIGKILLs itself between
accepting a transfer and receiving its bytes, a peer that never shows up.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.distributed.harness import run_world

SIZES = [0, 1, 4095, 4096, (1 << 20) + 7, (16 << 20) + 3]


def _payload(src: int, dst: int, size: int) -> bytes:
    g = torch.Generator().manual_seed(1000003 * src + 7919 * dst + size)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g).numpy().tobytes()


def _as_kind(data: bytes, kind: int):
    """The same bytes as each kind of buffer the transport takes."""
    if kind == 0:
        return data
    if kind == 1:
        return memoryview(bytearray(data))
    if kind == 2:
        return (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
    if len(data) % 4 == 0 and data:  # a float tensor moves as its bytes
        return torch.frombuffer(bytearray(data), dtype=torch.float32)
    return bytearray(data)


def _out(size: int, kind: int):
    return torch.zeros(size, dtype=torch.uint8) if kind % 2 else bytearray(size)


def _bytes(buf) -> bytes:
    return buf.numpy().tobytes() if isinstance(buf, torch.Tensor) else bytes(buf)


def _all_pairs(rank, world):
    """Every rank sends to every other rank at once, at every size, with every buffer kind."""
    from recoverkit.distributed.transport import ProcessGroupTransport

    transport = ProcessGroupTransport(timeout_s=60)
    peers = [p for p in range(world) if p != rank]
    moved = 0
    for i, size in enumerate(SIZES):
        sends = {p: _as_kind(_payload(rank, p, size), (i + p) % 4) for p in peers}
        recvs = {p: _out(size, i + p) for p in peers}
        got = transport.exchange(sends, recvs)
        assert got == {p: size for p in peers}, got
        for p in peers:
            assert _bytes(recvs[p]) == _payload(p, rank, size), (rank, p, size)
        moved += sum(got.values())
    # one-sided calls: a ring, each rank sending on and receiving from behind, in two turns
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    data = _payload(rank, nxt, 12345)
    buf = bytearray(12345)
    if rank % 2 == 0:
        transport.send(nxt, data)
        assert transport.recv_into(prev, buf) == 12345
    else:
        assert transport.recv_into(prev, buf) == 12345
        transport.send(nxt, data)
    assert bytes(buf) == _payload(prev, rank, 12345)
    transport.close()
    return moved


@pytest.mark.parametrize("world", [2, 3])
def test_buffers_of_every_size_and_kind_arrive_bit_exact(world):
    moved = run_world(world, _all_pairs, timeout_s=240)
    assert moved == [sum(SIZES) * (world - 1)] * world


def _corrupted_once(rank, world):
    from recoverkit.distributed.transport import ProcessGroupTransport
    from recoverkit.errors import IntegrityError

    flipped = []

    def flip(peer, view):  # the wire is fine; the bytes change after they landed, before the check
        if not flipped:
            view[view.numel() // 2] ^= 0x5A
            flipped.append(peer)

    transport = ProcessGroupTransport(timeout_s=60, on_arrival=flip if rank == 1 else None)
    data = _payload(0, 1, 1 << 16)
    buf = bytearray(1 << 16)
    with pytest.raises(IntegrityError, match="CRC-32C") as caught:
        if rank == 0:
            transport.send(1, data)
        else:
            transport.recv_into(0, buf)
    message = str(caught.value)
    # the transport is still in step: the retry goes through and is verified
    if rank == 0:
        transport.send(1, data)
    else:
        assert transport.recv_into(0, buf) == len(data)
        assert bytes(buf) == data and flipped == [0]
    transport.close()
    return message


def test_a_transfer_corrupted_on_arrival_fails_on_both_ends_and_can_be_retried():
    sender, receiver = run_world(2, _corrupted_once, timeout_s=120)
    assert "rank 1 received 65536 bytes that failed their CRC-32C" in sender
    assert "from rank 0 fail their CRC-32C" in receiver


def _oversized(rank, world):
    from recoverkit.distributed.transport import ProcessGroupTransport
    from recoverkit.errors import IntegrityError

    transport = ProcessGroupTransport(timeout_s=60)
    data = _payload(0, 1, 1000)
    small = bytearray(500)
    larger = torch.zeros(2000, dtype=torch.uint8)
    messages = []
    for exact in (True, False):  # 1000 bytes into a 500-byte buffer: refused either way
        with pytest.raises(IntegrityError) as caught:
            if rank == 0:
                transport.send(1, data)
            else:
                transport.recv_into(0, small, exact=exact)
        messages.append(str(caught.value))
    if rank == 1:
        assert small == bytearray(500)  # nothing was written
        with pytest.raises(IntegrityError, match="exactly 2000"):
            transport.recv_into(0, larger)  # exact by default: 1000 != 2000
        assert transport.recv_into(0, larger, exact=False) == 1000  # a limit, not a size
        assert larger[:1000].numpy().tobytes() == data and not larger[1000:].any()
    else:
        with pytest.raises(IntegrityError, match="refused 1000 bytes"):
            transport.send(1, data)
        transport.send(1, data)
    transport.close()
    return messages


def test_the_receiver_sizes_every_transfer_and_refuses_a_larger_one():
    sender, receiver = run_world(2, _oversized, timeout_s=120)
    assert all("rank 1 refused 1000 bytes (its buffer takes 500)" in m for m in sender), sender
    assert "announced 1000 bytes, the receive buffer takes exactly 500: refused" in receiver[0]
    assert "at most 500" in receiver[1]


def _accept_then_die(transport, src, dst):
    """Play the receiver's side by hand up to accepting the transfer, then SIGKILL this process."""
    import torch.distributed as dist

    from recoverkit.distributed import transport as tp

    header = torch.zeros(4, dtype=torch.int64)
    dist.irecv(header, src, transport.group, tp._HEADER).wait()
    assert int(header[0]) == tp.MAGIC
    dist.isend(
        torch.tensor([1, int(header[2])], dtype=torch.int64), src, transport.group, tp._REPLY
    ).wait()
    os.kill(os.getpid(), signal.SIGKILL)


def _peer_killed(rank, world, timeout_s):
    from recoverkit.distributed.transport import (
        PeerLostError,
        PeerTimeoutError,
        ProcessGroupTransport,
    )

    transport = ProcessGroupTransport(timeout_s=timeout_s)
    size = 8 << 20
    victim = world - 1
    # a first exchange goes through, so the peers are connected before one dies
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    got = transport.exchange({nxt: _payload(rank, nxt, 64)}, {prev: bytearray(64)})
    assert got == {prev: 64}
    if (
        rank == victim
    ):  # it accepts a transfer from rank victim - 1, then dies before the bytes move
        _accept_then_die(transport, victim - 1, rank)
    if rank == victim - 1:  # sends to the victim (and to rank 0 in a larger world)
        sends = {victim: _payload(rank, victim, size)} | ({0: b"x" * 10} if world > 2 else {})
        recvs = {}
    elif rank == 0 and world > 2:  # receives from rank victim - 1 and sends to the victim
        sends, recvs = {victim: _payload(rank, victim, size)}, {victim - 1: bytearray(10)}
    with pytest.raises((PeerLostError, PeerTimeoutError)) as caught:
        transport.exchange(sends, recvs)
    assert caught.value.peer == victim and f"rank {victim}" in str(caught.value), str(caught.value)
    if isinstance(caught.value, PeerLostError):
        with pytest.raises(PeerLostError, match="is gone"):
            transport.send(victim, b"again")
    if world > 2:  # the survivors' own transfers went through, and they still talk to each other
        if rank == 0:
            assert recvs[victim - 1] == b"x" * 10
        other = 1 - rank
        got = transport.exchange({other: _payload(rank, other, 5000)}, {other: bytearray(5000)})
        assert got == {other: 5000}
    return type(caught.value).__name__


@pytest.mark.parametrize("world", [2, 3])
def test_a_peer_killed_mid_transfer_raises_on_the_survivors_naming_it(world):
    results = run_world(world, _peer_killed, 20.0, final_barrier=False, timeout_s=120)
    assert results[-1] is None  # the victim never reported
    assert all(r in ("PeerLostError", "PeerTimeoutError") for r in results[:-1]), results


def _absent(rank, world):
    import torch.distributed as dist

    from recoverkit.distributed.transport import (
        PeerTimeoutError,
        ProcessGroupTransport,
        TransportError,
    )

    transport = ProcessGroupTransport(timeout_s=60)
    if rank == 0:
        with pytest.raises(PeerTimeoutError, match="rank 1 did not complete the header") as caught:
            transport.recv_into(1, bytearray(10), timeout_s=2.0)
        assert caught.value.peer == 1
        with pytest.raises(
            TransportError, match="broken"
        ):  # its connection is closed: a new one is needed
            transport.recv_into(1, bytearray(10))
    dist.barrier()  # on the default group: rank 1 stays alive (but silent) until rank 0 gave up
    return True


def test_a_silent_peer_times_out_naming_it():
    assert run_world(2, _absent, final_barrier=False, timeout_s=120) == [True, True]
