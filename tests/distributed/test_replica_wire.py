"""The replication header as hostile input, and the receiver's record check (no world needed)."""

from __future__ import annotations

import pytest

from recoverkit.errors import IntegrityError
from recoverkit.format.checksum import crc32c
from recoverkit.format.manifest import BlobRecord, ShardRecord
from recoverkit.format.shm_index import data_file, decode_index, make_index
from recoverkit.staging.replica_wire import (
    ANNOUNCE,
    HEADER,
    HOLDER,
    OVERSIZE,
    STOP,
    Header,
    decode_header,
    encode_header,
    verify_records,
)


def _buf(raw: bytes, size: int = 4096) -> bytearray:
    buf = bytearray(size)
    buf[: len(raw)] = raw
    return buf


def test_a_header_round_trips_with_its_index():
    h = Header(ANNOUNCE | HOLDER, 7, 42, 1 << 20, 41, 40, 1 << 30, 4096, b"index bytes")
    got = decode_header(_buf(encode_header(h)), 7, peer=3)
    assert got == Header(ANNOUNCE | HOLDER, 7, 42, 1 << 20, 41, 40, 1 << 30, 4096, b"index bytes", 11)


def test_an_oversize_announcement_carries_the_length_only():
    raw = encode_header(Header(OVERSIZE | STOP, 0, 5, 100, -1, -1, 0, 0, b"x" * 5000))
    assert len(raw) == HEADER.size
    got = decode_header(_buf(raw, HEADER.size), 0, peer=1)
    assert got.index == b"" and got.index_len == 5000 and got.flags == OVERSIZE | STOP


@pytest.mark.parametrize("at", [0, 6, 8, 20, HEADER.size - 1, HEADER.size + 3])
def test_a_flipped_byte_anywhere_is_refused(at):
    raw = bytearray(encode_header(Header(ANNOUNCE, 2, 9, 10, -1, -1, 0, 0, b"0123456789")))
    raw[at] ^= 0x40
    with pytest.raises(IntegrityError, match="rank 5"):
        decode_header(_buf(bytes(raw)), 2, peer=5)


def test_a_stale_header_of_another_round_is_refused():
    raw = encode_header(Header(0, 3, -1, 0, -1, -1, 0, 0, b""))
    with pytest.raises(IntegrityError, match="round 3, expected 4"):
        decode_header(_buf(raw), 4, peer=1)


def test_an_index_length_beyond_the_buffer_is_refused_before_reading():
    raw = encode_header(Header(ANNOUNCE, 0, 1, 1, -1, -1, 0, 0, b"z" * 100))
    with pytest.raises(IntegrityError, match="do not fit"):
        decode_header(bytearray(raw[: HEADER.size + 50]), 0, peer=2)
    with pytest.raises(IntegrityError, match="buffer of 10 bytes"):
        decode_header(bytearray(10), 0, peer=2)
    with pytest.raises(IntegrityError, match="not one"):
        decode_header(bytearray(HEADER.size), 0, peer=2)  # zeros: no magic


def _snapshot(data: bytes):
    f = data_file(1)
    records = {
        "rank": 1,
        "blob": BlobRecord(1, f, 0, 8, crc32c(data[:8])).to_json(),
        "shards": [["w", ShardRecord(1, f, 8, len(data) - 8, crc32c(data[8:]), (0,), (len(data) - 8,)).to_json()]],
        "files": {f: len(data)},
    }
    raw = make_index(step=3, run_id="r", world_size=2, rank=1, records=records,
                     shards_meta={"w": ["uint8", [len(data) - 8]]}, aliases={}, data_bytes=len(data))  # fmt: skip
    return decode_index(raw, path="t")


def test_every_record_is_checked_blob_and_shards():
    data = bytes(range(256)) * 4
    idx = _snapshot(data)
    assert verify_records(idx, memoryview(data)) is None
    for at, what in ((3, "the blob"), (900, "shard 'w'")):
        bad = bytearray(data)
        bad[at] ^= 1
        assert what in verify_records(idx, memoryview(bad))
