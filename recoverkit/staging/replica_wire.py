"""The replication wire: the per-round header between two peers, and the receiver's check.

Where it sits: under :mod:`recoverkit.staging.replicator` (the rounds). Every round each
rank sends each peer one header (:data:`HEADER`, then the announced index's bytes) and
receives one into a buffer it sized itself; a header is hostile input: :func:`decode_header`
checks its magic, version, its own CRC-32C (over every field and the index), its round
(a stale buffer from an earlier round never passes) and that the index fits the buffer.
:func:`verify_records` is the receiver's check of a replica before it is committed: the
CRC-32C of every record of the index (blob and shards), whatever the transport checked.

Example:
    >>> raw = encode_header(Header(ANNOUNCE, 0, 5, 4096, -1, -1, 0, 0, b"{...}"))
    >>> h = decode_header(bytearray(raw), 0, peer=1)
    >>> h.step, h.index, h.index_len
    (5, b'{...}', 5)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..errors import IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.shm_index import ShmIndex

__all__ = ["ANNOUNCE", "HEADER", "HOLDER", "OVERSIZE", "STOP", "Header", "decode_header", "encode_header", "verify_records"]

#: magic, version, flags, reserved, round, step, data_bytes, held, refused, capacity,
#: index_cap, index_len, crc
HEADER = struct.Struct("<4sBBHQqQqqQIII")
MAGIC, VERSION = b"RKRH", 1
#: flags: the sender stops; an index follows; an index too large for the receiver's buffer
#: (its length only); the holder fields (held, refused, capacity, index_cap) are set
STOP, ANNOUNCE, OVERSIZE, HOLDER = 1, 2, 4, 8


@dataclass
class Header:
    """One header: to a holder, the announcement; to an owner, what this rank holds of it."""

    flags: int
    round: int
    step: int
    data_bytes: int
    held: int
    refused: int  # (HOLDER) the newest step it refused from the receiver (not announced again)
    capacity: int
    index_cap: int  # (HOLDER) the index bytes its header buffer takes
    index: bytes  # the announced index (ANNOUNCE), else empty
    index_len: int = 0  # its length (ANNOUNCE, OVERSIZE)


def encode_header(h: Header) -> bytes:
    """The header's bytes: the fixed fields, then the index (ANNOUNCE only), CRC over both."""
    index = h.index if h.flags & ANNOUNCE else b""
    n = len(h.index) if h.flags & (ANNOUNCE | OVERSIZE) else 0
    fields = (MAGIC, VERSION, h.flags, 0, h.round, h.step, h.data_bytes, h.held, h.refused, h.capacity, h.index_cap, n)
    crc = crc32c(index, crc32c(HEADER.pack(*fields, 0)))
    return HEADER.pack(*fields, crc) + index


def decode_header(buf: bytearray, round_: int, peer: int) -> Header:
    """Parse a header from ``peer`` as hostile input (IntegrityError naming what is wrong)."""
    if len(buf) < HEADER.size:
        raise IntegrityError(f"replication header from rank {peer}: buffer of {len(buf)} bytes")
    magic, ver, flags, reserved, rnd, step, nbytes, held, refused, cap, icap, n, crc = HEADER.unpack_from(buf)
    if magic != MAGIC or ver != VERSION:
        raise IntegrityError(f"replication header from rank {peer}: not one (magic {magic!r}, version {ver})")
    body = n if flags & ANNOUNCE else 0
    if body > len(buf) - HEADER.size:
        raise IntegrityError(f"replication header from rank {peer}: {n} index bytes do not fit its buffer")
    fields = (magic, ver, flags, reserved, rnd, step, nbytes, held, refused, cap, icap, n)
    index = bytes(buf[HEADER.size : HEADER.size + body])
    found = crc32c(index, crc32c(HEADER.pack(*fields, 0)))
    if found != crc:
        raise IntegrityError(
            f"replication header from rank {peer} fails its CRC-32C (sent {hexcrc(crc)}, found {hexcrc(found)})"
        )
    if rnd != round_:
        raise IntegrityError(f"replication header from rank {peer} is of round {rnd}, expected {round_}")
    return Header(flags, rnd, step, nbytes, held, refused, cap, icap, index, n if flags & (ANNOUNCE | OVERSIZE) else 0)


def verify_records(index: ShmIndex, data: memoryview, *, engine: Any = None) -> str | None:
    """Check the CRC-32C of every record of ``index`` (blob and shards) over ``data``; the
    first record that fails, described, or None when all pass."""
    records = [("the blob", index.blob.offset, index.blob.nbytes, index.blob.crc32c)]
    records += [(f"shard {key!r}", s.offset, s.nbytes, s.crc32c) for key, s in index.shards]
    for what, off, n, want in records:
        found = crc32c(data[off : off + n], engine=engine) if n else 0
        if found != want:
            return f"{what} at [{off}, {off + n}) has crc {hexcrc(found)}, the index records {hexcrc(want)}"
    return None
