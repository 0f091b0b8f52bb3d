"""The manifest schema: round trip, self-checksum, version and format checks."""

from __future__ import annotations

import json

import pytest

from recoverkit.errors import IncompatibleCheckpointError, IntegrityError
from recoverkit.format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord
from recoverkit.format.segment import align_up, plan_offsets, segment_name


def _manifest():
    shard = ShardRecord(0, "rank-00000.seg", 4096, 400, 0x1234, (0, 0), (10, 10))
    return Manifest(
        step=12,
        run_id="run",
        world_size=1,
        tensors={
            "m/w": TensorRecord("m/w", "float32", (10, 10), (shard,)),
            "m/tied": TensorRecord("m/tied", "float32", (10, 10), alias_of="m/w"),
        },
        blobs=(BlobRecord(0, "rank-00000.seg", 0, 100, 0x99),),
        files={"rank-00000.seg": 4496},
        user_meta={"loss": 1.5},
    )


def test_round_trip():
    m = _manifest()
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m
    assert back.nbytes == 500


def test_any_edit_breaks_the_checksum():
    body = json.loads(_manifest().to_bytes())
    body["tensors"]["m/w"]["shards"][0]["crc32c"] += 1
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        Manifest.from_bytes(json.dumps(body).encode(), path="x/manifest.json")


def test_foreign_and_future_formats():
    body = json.loads(_manifest().to_bytes())
    with pytest.raises(IncompatibleCheckpointError, match="format version 3"):
        Manifest.from_bytes(json.dumps({**body, "version": 3}).encode())
    with pytest.raises(IncompatibleCheckpointError, match="not a recoverkit manifest"):
        Manifest.from_bytes(b'{"format": "zarr"}')
    with pytest.raises(IntegrityError, match="not valid JSON"):
        Manifest.from_bytes(b"\x00\xff")


def test_check_files_names_the_file():
    m = _manifest()
    with pytest.raises(IntegrityError, match="missing"):
        m.check_files({"rank-00000.seg": None}, where="root/step")
    with pytest.raises(IntegrityError, match="size 10 bytes, manifest records 4496"):
        m.check_files({"rank-00000.seg": 10}, where="root/step")
    m.check_files({"rank-00000.seg": 4496}, where="root/step")


def test_segment_layout_is_aligned():
    offsets, end = plan_offsets([1, 4096, 4097, 0, 5])
    assert offsets == [0, 4096, 8192, 16384, 16384]
    assert end == 16389
    assert all(o % 4096 == 0 for o in offsets)
    assert align_up(0) == 0 and align_up(1) == 4096
    assert segment_name(12) == "rank-00012.seg"
    with pytest.raises(ValueError):
        plan_offsets([-1])
