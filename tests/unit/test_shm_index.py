"""The shared-memory index: round trip, and every crafted index refused with a named fault."""

from __future__ import annotations

import json

import pytest

from recoverkit.distributed.commit import build_manifest
from recoverkit.errors import IntegrityError
from recoverkit.format.checksum import crc32c, hexcrc
from recoverkit.format.manifest import BlobRecord, ShardRecord, TensorRecord
from recoverkit.format.shm_index import (
    MAX_DATA_BYTES,
    MAX_INDEX_BYTES,
    data_file,
    decode_index,
    encode_index,
    make_index,
)
from recoverkit.format.validate import check_manifest
from recoverkit.storage.base import RankRecords, ShardMeta

F = data_file(1)


def _records(rank=1, file=F, data_bytes=64):
    return RankRecords(
        rank=rank,
        blob=BlobRecord(rank, file, 0, 16, 0x1234),
        shards=[
            ("w", ShardRecord(rank, file, 16, 32, 0xABCD, (0,), (8,))),
            ("b", ShardRecord(rank, file, 48, 16, 0x1111, (0,), (4,))),
        ],
        files={file: data_bytes},
    )


SHARDS = [ShardMeta("w", "float32", (8,), (0,), (8,)), ShardMeta("b", "float32", (4,), (0,), (4,))]
ALIASES = {"w2": TensorRecord("w2", "float32", (8,), alias_of="w")}


def _index(**over):
    kw = dict(step=7, run_id="run", world_size=2, rank=1, records=_records(), shards_meta=SHARDS, aliases=ALIASES,
              data_bytes=64)
    kw.update(over)
    return make_index(**kw)


def _resign(body: dict) -> bytes:
    text = json.dumps(body, separators=(",", ":")).encode()
    return text + b"\n" + hexcrc(crc32c(text))[2:].encode() + b"\n"


def _body() -> dict:
    return json.loads(_index().split(b"\n")[0])


def test_round_trip_builds_a_manifest_that_validates():
    idx = decode_index(_index(), path="slot-0.index")
    assert (idx.step, idx.run_id, idx.world_size, idx.rank, idx.data_bytes) == (7, "run", 2, 1, 64)
    assert [k for k, _ in idx.shards] == ["w", "b"] and idx.files == {F: 64}
    assert idx.meta["tensors"]["w"] == ["float32", [8]]
    # a world of two from two indexes: build_manifest + validate are the one gate
    f0 = data_file(0)
    records0 = RankRecords(0, BlobRecord(0, f0, 0, 16, 5), [], {f0: 16})
    rank0 = decode_index(make_index(step=7, run_id="run", world_size=2, rank=0, records=records0, shards_meta={},
                                    aliases={}, data_bytes=16), path="a")
    reports = [(RankRecords(i.rank, i.blob, list(i.shards), dict(i.files)), i.meta) for i in (rank0, idx)]
    m = build_manifest(step=7, run_id="run", world_size=2, ranks=reports)
    check_manifest(m, where="memory")
    assert m.tensors["w2"].alias_of == "w" and m.files == {data_file(0): 16, F: 64}


def test_records_of_another_rank_or_file_are_refused():
    with pytest.raises(IntegrityError, match="expected {'rank-00001.data': 64}"):
        decode_index(_index(records=_records(file="../etc/passwd")), path="x")
    body = _body()
    body["records"]["shards"][1][1]["file"] = "../etc/passwd"
    with pytest.raises(IntegrityError, match="shard 'b' names rank 1 file '../etc/passwd', expected rank 1"):
        decode_index(_resign(body), path="x")
    with pytest.raises(IntegrityError, match="records of rank 0"):
        decode_index(_index(records=_records(rank=0)), path="x")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["records"]["shards"][0][1].update(offset=60), "lie outside the 64 data bytes"),
        (lambda b: b["records"]["blob"].update(nbytes=65), "lie outside"),
        (lambda b: b["records"]["blob"].update(offset=-1), "lie outside"),
        (lambda b: b["records"]["shards"][0][1].update(crc32c=1 << 32), "32-bit"),
        (lambda b: b.update(data_bytes=MAX_DATA_BYTES + 1), "data_bytes"),
        (lambda b: b.update(step=-1), "step -1 is out of range"),
        (lambda b: b.update(step=1 << 70), "step"),
        (lambda b: b.update(rank=2), "rank 2 is out of range"),
        (lambda b: b.update(world_size=0), "world_size"),
        (lambda b: b.update(step="7"), "step must be an integer"),
        (lambda b: b.update(run_id="x" * 1000), "run_id"),
        (lambda b: b.update(format="other"), "not a recoverkit-shm-index"),
        (lambda b: b.update(version=2), "version"),
        (lambda b: b.update(extra=1), "unknown"),
        (lambda b: b.pop("meta"), "missing"),
        (lambda b: b["records"].update(files={F: 65}), "files"),
        (lambda b: b["records"].update(files={F: 64, "other": 1}), "files"),
        (lambda b: b["meta"]["tensors"].pop("w"), "no \\[dtype, shape\\]"),
        (lambda b: b["meta"]["tensors"].update(w=["float32", [-1]]), "not a list of sizes"),
        (lambda b: b["meta"]["aliases"].update(z={"dtype": "float32", "shape": [1], "shards": []}), "alias"),
        (lambda b: b["records"]["shards"][0][1].update(pack=[0, 1, 2]), "unknown"),
        (lambda b: b["records"]["shards"].append(["x"]), "shard must be"),
    ],
)
def test_crafted_indexes_are_refused(mutate, message):
    body = _body()
    mutate(body)
    with pytest.raises(IntegrityError, match=message) as info:
        decode_index(_resign(body), path="/shm/slot-1.index")
    assert "/shm/slot-1.index" in str(info.value) and info.value.path == "/shm/slot-1.index"


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "truncated"),
        (b"{}\n", "truncated"),
        (_index()[:-20], "truncated|checksum"),
        (_index()[:-10] + b"\nGGGGGGGG\n", "8 hex digits"),
        (_index()[:-10] + b"\n0x123456\n", "8 hex digits"),
        (_index().replace(b'"step":7', b'"step":8'), "checksum mismatch"),
    ],
)
def test_torn_or_edited_indexes_are_refused(raw, message):
    with pytest.raises(IntegrityError, match=message):
        decode_index(raw, path="slot-0.index")


def test_strict_json_and_size_cap():
    body = _index().split(b"\n")[0]
    for text in (
        body.replace(b'"step":7', b'"step":7,"step":7'),  # duplicate key
        body.replace(b'"step":7', b'"step":7.0'),  # a float
        body.replace(b'"step":7', b'"step":NaN'),
        b"[" * 100000 + b"]" * 100000,  # deep nesting
    ):
        raw = text + b"\n" + hexcrc(crc32c(text))[2:].encode() + b"\n"
        with pytest.raises(IntegrityError):
            decode_index(raw, path="x")

    class Huge:
        def __len__(self):
            return MAX_INDEX_BYTES + 1

    with pytest.raises(IntegrityError, match="more than an index may have"):
        decode_index(Huge(), path="x")  # type: ignore[arg-type]


def test_self_contained_is_optional_and_strict():
    assert decode_index(_index(), path="x").self_contained
    assert not decode_index(_index(self_contained=False), path="x").self_contained
    body = _body()
    body["self_contained"] = 1
    with pytest.raises(IntegrityError, match="self_contained must be true or false"):
        decode_index(_resign(body), path="x")


def test_encode_index_writes_what_decode_reads_and_the_records_json():
    records = _records()
    records.shards[0] = ('w"\u00e9\u2028\\', records.shards[0][1])  # a key that needs escaping
    meta = [ShardMeta('w"\u00e9\u2028\\', "float32", (8,), (0,), (8,)), SHARDS[1]]
    raw, built = encode_index(step=7, run_id="run", world_size=2, rank=1, records=records, shards_meta=meta,
                              aliases=ALIASES, data_bytes=64, self_contained=False)
    assert decode_index(raw, path="x") == built
    same = make_index(step=7, run_id="run", world_size=2, rank=1, records=records.to_json(), shards_meta=meta,
                      aliases=ALIASES, data_bytes=64, self_contained=False)
    assert json.loads(same.split(b"\n")[0]) == json.loads(raw.split(b"\n")[0])
