"""One verified pass for the bytes of a memory restore (issue 12).

The sender sends snapshot bytes without computing a CRC (``transport.Unsigned``); the
receiver checks them against its own records as they land (``checks``) and nothing else
checks them again: a receiver without records refuses them, a corruption on arrival fails on
both ends (naming the region on the receiver) and the transport works on, and a MemoryTier
whose bytes nothing can change tells the in-place restore so (``views_verified``).
"""

from __future__ import annotations

import ctypes

import pytest

from recoverkit.format.checksum import crc32c
from recoverkit.format.manifest import BlobRecord, Manifest
from recoverkit.recovery.memory_source import Area, MemoryTier, OwnerBytes, data_name
from tests.distributed.harness import run_world


def _payload(n: int) -> bytes:
    return bytes((i * 131 + 7) % 251 for i in range(n))


def _regions_check(data: bytes, calls: list[int]):
    """A receiver's check: two records over the payload's halves, each by its own CRC."""
    from recoverkit.errors import IntegrityError

    half = len(data) // 2
    records = [(0, half, crc32c(data[:half]), "'a'"), (half, len(data) - half, crc32c(data[half:]), "'b'")]

    def check(landed: memoryview) -> None:
        calls.append(landed.nbytes)
        for offset, n, crc, name in records:
            if crc32c(landed[offset : offset + n]) != crc:
                raise IntegrityError(f"{name} at {offset} fails its record")

    return check


def _one_pass(rank: int, world: int) -> dict:
    from recoverkit.distributed.transport import ProcessGroupTransport, Unsigned
    from recoverkit.errors import IntegrityError

    flipped: list[int] = []

    def flip(peer, view):  # the second transfer that lands (the refused one does not): one byte changes
        flipped.append(peer)
        if len(flipped) == 2:
            view[view.numel() * 3 // 4] ^= 0x5A

    transport = ProcessGroupTransport(timeout_s=60, on_arrival=flip if rank == 1 else None)
    data = _payload(1 << 16)
    out: dict = {}
    calls: list[int] = []
    check = _regions_check(data, calls)
    # 1. unsigned + the receiver's records: verified once, by the check
    buf = bytearray(len(data))
    if rank == 0:
        transport.exchange({1: Unsigned(memoryview(data))}, None)
    else:
        out["got"] = transport.exchange(None, {0: buf}, checks={0: check})[0]
        out["exact"] = bytes(buf) == data
        out["calls"] = list(calls)
    # 2. unsigned to a receiver without records: refused before a byte moves, on both ends
    with pytest.raises(IntegrityError) as caught:
        if rank == 0:
            transport.exchange({1: Unsigned(data)}, None)
        else:
            transport.exchange(None, {0: bytearray(len(data))})
    out["refused"] = str(caught.value)
    # 3. corrupted on arrival: the check names the region; the sender learns it failed
    with pytest.raises(IntegrityError) as caught:
        if rank == 0:
            transport.exchange({1: Unsigned(data)}, None)
        else:
            transport.exchange(None, {0: bytearray(len(data))}, checks={0: check})
    out["corrupt"] = str(caught.value)
    # 4. still in step: a signed transfer goes through
    if rank == 0:
        transport.send(1, data)
    else:
        buf = bytearray(len(data))
        transport.recv_into(0, buf)
        out["after"] = bytes(buf) == data
    transport.close()
    return out


def test_unsigned_bytes_are_verified_once_by_the_receivers_records():
    sender, receiver = run_world(2, _one_pass, timeout_s=120)
    assert receiver["got"] == 1 << 16 and receiver["exact"] and receiver["calls"] == [1 << 16]
    assert "without a CRC" in receiver["refused"] and "refused" in sender["refused"]
    assert "'b' at 32768 fails its record" in receiver["corrupt"]
    assert "failed its check" in sender["corrupt"]
    assert receiver["after"]


def _tier(*, stable: bool) -> MemoryTier:
    pool, blob = bytearray(b"tensor bytes"), bytearray(b"{}")
    at = ctypes.addressof(ctypes.c_char.from_buffer(pool))
    blob_at = ctypes.addressof(ctypes.c_char.from_buffer(blob))
    rec = BlobRecord(0, data_name(0), len(pool), len(blob), crc32c(blob))
    m = Manifest(step=3, run_id="r", world_size=1, blobs=(rec,), files={data_name(0): len(pool) + len(blob)})
    owner = OwnerBytes(memoryview(pool), at, "own host memory", {(len(pool), 2)}, stable=stable,
                       extra=(Area(len(pool), memoryview(blob), blob_at),))  # fmt: skip
    return MemoryTier(m, {0: owner})


def test_a_memory_tier_says_its_views_are_verified_only_when_nothing_can_change_them():
    assert _tier(stable=True).views_verified
    assert not _tier(stable=False).views_verified  # a shared-memory slot: another writer may exist
    tier = _tier(stable=True)
    rec = tier.manifest(3).blobs[0]
    assert bytes(tier.memory_view(3, rec)) == b"{}"  # the blob, from the area after the pool
    out = bytearray(2)
    tier.read(3, [(rec, out)])
    assert out == b"{}"
