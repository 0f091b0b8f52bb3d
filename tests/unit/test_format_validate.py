"""The one manifest validation: every record is checked before anything it describes is
allocated, read or written (issue: hostile checkpoints). Each case re-signs an edited
manifest, as an attacker can, and must be refused with IntegrityError naming the fault."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from recoverkit.errors import IncompatibleCheckpointError, IntegrityError
from recoverkit.format.checksum import crc32c, hexcrc
from recoverkit.format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord
from recoverkit.format.validate import check_manifest, check_name
from recoverkit.storage.base import destination

SEG = "rank-00000.seg"


def _shard(offsets, shape, offset, itemsize=4, rank=0, file=SEG, crc=7):
    n = 1
    for d in shape:
        n *= d
    return ShardRecord(rank, file, offset, n * itemsize, crc, tuple(offsets), tuple(shape))


def _manifest(**tensors: TensorRecord) -> Manifest:
    return Manifest(
        step=5, run_id="r", world_size=1, tensors=tensors,
        blobs=(BlobRecord(0, SEG, 0, 100, 1),), files={SEG: 1 << 20},
    )


def _body(m: Manifest) -> dict:
    return json.loads(m.to_bytes())


def _signed(body: dict) -> bytes:
    body = {k: v for k, v in body.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["checksum"] = hexcrc(crc32c(canon))
    return json.dumps(body).encode()


def _grid() -> Manifest:
    """A 4x6 tensor in a 2x2 grid of shards, the first split again along dim 0."""
    shards = (
        _shard((0, 0), (1, 3), 4096), _shard((1, 0), (1, 3), 8192),
        _shard((0, 3), (2, 3), 12288), _shard((2, 0), (2, 3), 16384), _shard((2, 3), (2, 3), 20480),
    )
    return _manifest(
        w=TensorRecord("w", "float32", (4, 6), shards),
        s=TensorRecord("s", "float32", (), (_shard((), (), 24576),)),
        e=TensorRecord("e", "float32", (0, 3), (_shard((0, 0), (0, 3), 24580),)),
        t=TensorRecord("t", "float32", (4, 6), alias_of="w"),
    )


def test_a_well_formed_grid_parses_and_validates():
    m = _grid()
    back = Manifest.from_bytes(m.to_bytes())
    assert back.tensors["w"].shards == m.tensors["w"].shards
    check_manifest(back, where="x")


def _edit(fn) -> bytes:
    body = _body(_grid())
    fn(body)
    return _signed(body)


def _w(body):
    return body["tensors"]["w"]["shards"]


ATTACKS = {
    # the examples: a 0-d record whose shard is a 4 MB region
    "0d_shard_4MB": (lambda b: b["tensors"]["s"]["shards"][0].update(nbytes=4 << 20), "records"),
    # shards of shape [] with offsets [k] in a 1-D tensor (an unchecked write position)
    "rank_mismatch": (lambda b: _w(b)[0].update(shape=[], offsets=[100000]), "dimension"),
    "outside_global": (lambda b: _w(b)[4].update(offsets=[3, 3]), "outside the global shape"),
    "negative_offset": (lambda b: _w(b)[4].update(offsets=[-1, 3]), "outside the global shape"),
    # overlapping shards that leave an element uncovered (same element count)
    "overlap_gap": (lambda b: _w(b)[1].update(offsets=[0, 1]), "overlap"),
    "uncovered": (lambda b: _w(b).pop(), "hold"),
    "nbytes": (lambda b: _w(b)[0].update(nbytes=13), "records 13 bytes"),
    "past_file_end": (lambda b: _w(b)[0].update(offset=(1 << 20) - 4), "outside its"),
    "dotdot": (lambda b: _w(b)[0].update(file="../../x"), "plain file name"),
    "absolute": (lambda b: _w(b)[0].update(file="/etc/passwd"), "plain file name"),
    "nul": (lambda b: _w(b)[0].update(file="rank-00000.seg\x00x"), "plain file name"),
    "unlisted": (lambda b: _w(b)[0].update(file="other.seg"), "not listed"),
    "crc_minus_one": (lambda b: _w(b)[0].update(crc32c=-1), "32-bit"),
    "crc_2_32": (lambda b: _w(b)[0].update(crc32c=1 << 32), "32-bit"),
    "crc_string": (lambda b: _w(b)[0].update(crc32c="0"), "integer"),
    "crc_float": (lambda b: _w(b)[0].update(crc32c=7.0), "integer"),
    "crc_bool": (lambda b: _w(b)[0].update(crc32c=True), "integer"),
    "blob_3GiB": (lambda b: b["blobs"][0].update(nbytes=3 << 30), "outside its"),
    "file_size_negative": (lambda b: b["files"].update({SEG: -5}), "out of range"),
    "world_1e12": (lambda b: b.update(world_size=10**12), "world_size"),
    "world_zero": (lambda b: b.update(world_size=0, blobs=[]), "world_size"),
    "duplicate_blob_rank": (lambda b: b["blobs"].append(dict(b["blobs"][0])), "world_size"),
    "shard_rank_outside": (lambda b: _w(b)[0].update(rank=3), "not in the world"),
    "step_string": (lambda b: b.update(step="5"), "integer"),
    "step_huge": (lambda b: b.update(step=10**400), "out of range"),
    "shape_string": (lambda b: b["tensors"]["w"].update(shape="46"), "list of integers"),
    "shape_too_many_dims": (lambda b: b["tensors"]["s"].update(shape=[1] * 65), "not a tensor shape"),
    "shape_huge": (lambda b: b["tensors"]["e"].update(shape=[10**12, 10**12]), "bytes"),
    "tensors_list": (lambda b: b.update(tensors=[]), "JSON object"),
    "alias_missing": (lambda b: b["tensors"]["t"].update(alias_of="nope"), "not in the manifest"),
    "alias_cycle": (lambda b: b["tensors"].update(
        t={"dtype": "float32", "shape": [4, 6], "alias_of": "u"},
        u={"dtype": "float32", "shape": [4, 6], "alias_of": "t"}), "cycle"),
    "alias_shape": (lambda b: b["tensors"]["t"].update(shape=[24]), "alias"),
    "alias_with_shards": (lambda b: b["tensors"]["t"].update(shards=[]), "exactly one"),
    "unknown_field": (lambda b: _w(b)[0].update(extra=1), "unknown"),
    "missing_field": (lambda b: _w(b)[0].pop("crc32c"), "missing"),
    "held_unlisted": (lambda b: b.update(held=["x.seg"]), "held"),
    "pickled_int": (lambda b: b.update(pickled=1), "pickled"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_resigned_attack_is_refused_by_name(name):
    edit, words = ATTACKS[name]
    data = _edit(edit)
    with pytest.raises(IntegrityError) as info:
        Manifest.from_bytes(data, path="step-000000005/manifest.json")
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        b'{"format": "recoverkit", "version": 1, "step": NaN}',
        b'{"format": "recoverkit", "version": 1, "step": Infinity}',
        b'{"format": "recoverkit", "version": 1, "step": 1e400}',
        b'{"format": "recoverkit", "format": "recoverkit", "version": 1}',
        b"[" * 100000 + b"]" * 100000,
        b"\xff\xfe",
        b'{"format": "recoverkit", "version": 1, "step": ' + b"9" * 5000 + b"}",
    ],
    ids=["nan", "infinity", "overflow_float", "duplicate_key", "deep_nesting", "not_utf8", "int_too_long"],
)
def test_malformed_json_is_an_integrity_error(text):
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(text)


def test_unknown_dtype_is_incompatible_and_a_bool_version_is_not_version_1():
    with pytest.raises(IncompatibleCheckpointError):
        Manifest.from_bytes(_edit(lambda b: b["tensors"]["w"].update(dtype="float99")))
    with pytest.raises(IncompatibleCheckpointError):
        Manifest.from_bytes(_edit(lambda b: b.update(version=True)))


def test_too_fragmented_tensor_is_refused_not_searched_forever(monkeypatch):
    import recoverkit.format.validate as v

    monkeypatch.setattr(v, "OVERLAP_BUDGET", 50)
    shards = tuple(_shard((0, i), (4, 1), 4096 + 16 * i) for i in range(6)) + tuple(
        _shard((i, 6), (1, 1), 8192 + 4 * i) for i in range(4)
    )
    m = _manifest(w=TensorRecord("w", "float32", (4, 7), shards))
    check_manifest(m, where="x")  # disjoint and exact: the sweep goes along dim 1
    many = tuple(_shard((i, j), (1, 1), 4096 + 4 * (7 * i + j)) for i in range(4) for j in range(7))
    with pytest.raises(IntegrityError, match="too fragmented"):
        check_manifest(_manifest(w=TensorRecord("w", "float32", (4, 7), many)), where="x")


def test_zarr_layout_names_each_shard_by_its_array():
    from recoverkit.format.zarr_layout import array_path

    blob = BlobRecord(0, "blobs/rank-00000.json", 0, 10, 1)
    good = ShardRecord(0, array_path("w"), 0, 16, 3, (0,), (4,))
    m = Manifest(step=1, run_id="r", world_size=1, blobs=(blob,), files={blob.file: 10},
                 tensors={"w": TensorRecord("w", "float32", (4,), (good,))})
    check_manifest(m, where="z", arrays=True)
    bad = dict(m.tensors)
    bad["w"] = TensorRecord("w", "float32", (4,), (ShardRecord(0, "../../etc", 0, 16, 3, (0,), (4,)),))
    with pytest.raises(IntegrityError, match="its array is"):
        check_manifest(Manifest(step=1, run_id="r", world_size=1, blobs=(blob,), files={blob.file: 10}, tensors=bad),
                       where="z", arrays=True)
    with pytest.raises(IntegrityError, match="relative path"):
        check_name("blobs/../../x", where="z", nested=True)


def test_reads_land_only_in_destinations_of_the_record_size():
    assert destination(bytearray(8), 8, "x") != 0
    assert destination(torch.empty(2, dtype=torch.float32), 8, "x") != 0
    for buf, n in [(bytearray(4), 8), (torch.empty(3), 8), (bytes(8), 8), (torch.empty(4, 2).t(), 32)]:
        with pytest.raises((ValueError, TypeError)):
            destination(buf, n, "x")


def test_tier_read_refuses_a_short_destination(tmp_path):
    from recoverkit import Checkpointer

    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, {"w": torch.arange(1000, dtype=torch.float32)})
        m = ckpt.manifest(1)
        shard = m.tensors["w"].shards[0]
        small = bytearray(shard.nbytes - 1)
        with pytest.raises(ValueError, match="destination holds"):
            ckpt.tier.read(1, [(shard, small)])
        whole = torch.empty(1000, dtype=torch.float32)
        ckpt.tier.read(1, [(shard, whole)])
        assert torch.equal(whole, torch.arange(1000, dtype=torch.float32))


def test_the_checksum_covers_nothing_an_attacker_cannot_recompute():
    """A sanity check of the premise: re-signing makes an edited manifest pass the
    self-checksum, so validation, not the checksum, is what refuses it."""
    body = _body(_grid())
    evil = copy.deepcopy(body)
    _w(evil)[0]["offset"] = 0  # overlaps the blob region: allowed (regions may share bytes)
    Manifest.from_bytes(_signed(evil))


def test_a_save_whose_shards_leave_a_gap_fails_instead_of_committing_an_unreadable_step(tmp_path):
    from recoverkit import Checkpointer, ShardedTensor
    from recoverkit.errors import CommitError

    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, {"w": ShardedTensor(torch.ones(4, 3), (4, 3), (0, 0))})
        with pytest.raises(CommitError, match="hold 6 element"):
            ckpt.save(2, {"w": ShardedTensor(torch.ones(2, 3), (4, 3), (0, 0))})
        assert ckpt.steps() == [1]
        assert not [n for n in tmp_path.iterdir() if n.name.startswith(".tmp-")]
