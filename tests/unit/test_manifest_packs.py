"""Packs of small tensors (format version 2): compact on disk, every byte still verified,
and the pack tables treated as hostile input like every other manifest field."""

from __future__ import annotations

import base64
import json
import lzma
import os

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy
from recoverkit.errors import IntegrityError
from recoverkit.format.checksum import crc32c
from recoverkit.format.manifest import MANIFEST_NAME, Manifest
from recoverkit.state.codec import MAX_RATIO, decode, encode
from recoverkit.state.flatten import TensorLeaf
from recoverkit.storage.discovery import CheckpointSkippedWarning
from recoverkit.storage.fs import LocalFS
from recoverkit.storage.local import LocalTier

OPTS = CheckpointOptions(retention=RetentionPolicy(keep_last=None))


def _state(n: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(4, generator=g) for i in range(n)}


def _save(root: str, *steps: int, n: int = 200) -> dict[str, torch.Tensor]:
    state = _state(n)
    with Checkpointer(root, options=OPTS) as ckpt:
        for s in steps:
            ckpt.save(s, {"s": state, "big": torch.arange(1 << 15, dtype=torch.float32)})
    return state


def _manifest_path(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:09d}", MANIFEST_NAME)


def _body(root: str, step: int) -> dict:
    with open(_manifest_path(root, step), "rb") as f:
        return json.loads(f.read())


def _store(root: str, step: int, body: dict) -> None:
    """Write ``body`` re-signed (its checksum recomputed, as anyone can)."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["checksum"] = f"0x{crc32c(canonical):08x}"
    with open(_manifest_path(root, step), "w") as f:
        json.dump(body, f)


def _table(body: dict, i: int = 0) -> dict:
    return json.loads(lzma.decompress(base64.b64decode(body["packs"][i]["table"])))


def _set_table(body: dict, table: dict | bytes, i: int = 0) -> None:
    raw = table if isinstance(table, bytes) else json.dumps(table).encode()
    body["packs"][i]["table"] = base64.b64encode(lzma.compress(raw, format=lzma.FORMAT_XZ)).decode()


def test_small_tensors_are_packed_and_round_trip(tmp_path):
    root = str(tmp_path)
    state = _save(root, 1)
    body = _body(root, 1)
    assert body["version"] == 2 and "packs" in body
    assert sum(p["count"] for p in body["packs"]) >= 200
    assert not any(k.startswith("s/") for k in body["tensors"])  # all in the tables
    assert "big" in body["tensors"]  # large tensors keep their own record and CRC
    m = Manifest.from_bytes(json.dumps(body).encode())
    again = Manifest.from_bytes(m.to_bytes())
    assert again.tensors == m.tensors and again.to_bytes() == m.to_bytes()
    target = {"s": {k: torch.empty(4) for k in state}, "big": torch.empty(1 << 15)}
    with Checkpointer(root, options=OPTS) as ckpt:
        assert ckpt.restore(target) == 1
    assert all(torch.equal(target["s"][k], v) for k, v in state.items())


def test_a_step_without_small_tensors_stays_version_1(tmp_path):
    with Checkpointer(str(tmp_path), options=CheckpointOptions(capture_rng=False)) as ckpt:
        ckpt.save(1, {"w": torch.zeros(1 << 16)})
    body = _body(str(tmp_path), 1)
    assert body["version"] == 1 and "packs" not in body


def test_many_small_tensors_take_their_bytes_on_disk(tmp_path):
    """100k tensors of 4 floats: the step (segment + manifest) within 1.2x the data (it
    was 13x, with a 15 MiB manifest, before packs and compressed tables)."""
    root = str(tmp_path)
    state = {f"t{i}": torch.randn(4) for i in range(100_000)}
    with Checkpointer(root, options=CheckpointOptions(capture_rng=False)) as ckpt:
        ckpt.save(1, {"s": state})
    step_dir = os.path.join(root, "step-000000001")
    on_disk = sum(os.path.getsize(os.path.join(step_dir, f)) for f in os.listdir(step_dir))
    data = 100_000 * 16
    assert on_disk <= 1.2 * data, on_disk / data
    target = {"s": {k: torch.empty(4) for k in state}}
    with Checkpointer(root) as ckpt:
        ckpt.restore(target)
    assert all(torch.equal(target["s"][k], v) for k, v in state.items())


def test_rot_in_a_pack_falls_back_and_spares_other_entries(tmp_path):
    root = str(tmp_path)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with Checkpointer(root, options=OPTS) as ckpt:
        ckpt.save(1, {"model": model, "optim": opt})
        ckpt.save(2, {"model": model, "optim": opt})
    m = Manifest.from_bytes(open(_manifest_path(root, 2), "rb").read())
    opt_pack = m.tensors["optim/state/0/exp_avg"].shards[0].pack
    model_pack = m.tensors["model/weight"].shards[0].pack
    assert opt_pack is not None and model_pack is not None and opt_pack != model_pack  # one entry each
    seg = os.path.join(root, "step-000000002", opt_pack.file)
    with open(seg, "r+b") as f:  # bit rot in the optimizer's pack
        f.seek(opt_pack.offset + 5)
        b = f.read(1)
        f.seek(opt_pack.offset + 5)
        f.write(bytes([b[0] ^ 1]))
    with Checkpointer(root, options=OPTS) as ckpt:
        with pytest.warns(CheckpointSkippedWarning, match="crc32c mismatch"):
            assert ckpt.restore({"model": torch.nn.Linear(4, 4), "optim": torch.optim.Adam(model.parameters())}) == 1
        fresh = torch.nn.Linear(4, 4)
        assert ckpt.restore({"model": fresh}, step=2, strict=False) == 2  # the model's pack is intact
    assert torch.equal(fresh.weight, model.weight)


def test_reading_packed_tensors_one_by_one_reads_each_pack_once(tmp_path):
    root = str(tmp_path)
    _save(root, 1, n=500)
    reads: list[int] = []

    class CountingFS(LocalFS):
        def read_segment(self, path, items):  # type: ignore[no-untyped-def]
            reads.append(len(items))
            return super().read_segment(path, items)

    tier = LocalTier(root, fs=CountingFS())
    m = tier.manifest(1)
    packed = [(k, r.shards[0]) for k, r in m.tensors.items() if r.shards and r.shards[0].pack is not None]
    assert len(packed) >= 500
    for _, shard in packed:
        buf = bytearray(shard.nbytes)
        tier.read(1, [(shard, buf)])
    assert len(reads) == len({s.pack for _, s in packed})


# ---------------------------------------------------------------- hostile pack tables
def _attack(tmp_path, edit) -> str:  # noqa: ANN001
    root = str(tmp_path)
    _save(root, 1, 2)
    body = _body(root, 2)
    edit(body)
    _store(root, 2, body)
    with pytest.raises(IntegrityError) as e:
        Manifest.from_bytes(open(_manifest_path(root, 2), "rb").read())
    # every reader falls back to the good step
    target = {"s": {k: torch.empty(4) for k in _state()}, "big": torch.empty(1 << 15)}
    with Checkpointer(root, options=OPTS) as ckpt:
        with pytest.warns(CheckpointSkippedWarning):
            assert ckpt.restore(target) == 1
    return str(e.value)


def _edit_table(change):  # noqa: ANN001, ANN202
    def edit(body: dict) -> None:
        t = _table(body)
        change(t)
        _set_table(body, t)

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b["packs"][0].update(table="!!not base64!!"), "not base64"),
        (lambda b: b["packs"][0].update(table=base64.b64encode(b"\xfd7zXZ\x00garbage").decode()), "not valid xz data"),
        (lambda b: _set_table(b, b" " * (64 << 20)), "inflates beyond"),
        (lambda b: b["packs"][0].update(count=b["packs"][0]["count"] + 1), "count"),
        (lambda b: b["packs"][0].update(nbytes=16), "outside its pack"),
        (lambda b: b["packs"][0].update(offset=b["files"]["rank-00000.seg"]), "outside"),
        (lambda b: b["packs"][0].update(crc32c=1 << 32), "32-bit"),
        (lambda b: b["packs"][0].update(file="../../x"), "plain file name|pack"),
        (lambda b: b["packs"][0].update(rank=5), "rank"),
        (lambda b: b["packs"][0].update(extra=1), "unknown"),
        (lambda b: b.update(version=1), "a version 2 manifest has packs"),
        (lambda b: b.pop("packs") and b.update(version=2), "version 2 manifest has"),
        (_edit_table(lambda t: t.update(skip=[-1] + t["skip"][1:])), "out of range"),
        (_edit_table(lambda t: t.update(type=[99] + t["type"][1:])), "out of range"),
        (_edit_table(lambda t: t.update(keys=[t["keys"][1]] + t["keys"][1:])), "duplicate"),
        (_edit_table(lambda t: t.update(keys=["big"] + t["keys"][1:])), "duplicate"),
        (_edit_table(lambda t: t["types"][0].__setitem__(2, 1 << 40)), "outside|bytes"),
        (_edit_table(lambda t: t["types"][0].__setitem__(1, [2, 2, 2])), "bytes|outside"),
        (_edit_table(lambda t: t.update(keys=t["keys"][:-1])), "keys"),
        (_edit_table(lambda t: t.update(extra=[])), "unknown"),
        (_edit_table(lambda t: t.update(keys="abc")), "must be lists"),
    ],
)
def test_a_crafted_pack_table_is_refused(tmp_path, edit, message):
    import re

    assert re.search(message, _attack(tmp_path, edit))


def test_a_compressed_object_tree_is_bounded(tmp_path):
    tree = {"s": {f"t{i}": TensorLeaf(f"s/t{i}") for i in range(20_000)}}
    blob = encode(tree)
    assert blob.startswith(b"\xfd7zXZ\x00") and decode(blob) == tree
    bomb = lzma.compress(b"[" * (len(blob) * MAX_RATIO * 2), format=lzma.FORMAT_XZ)
    with pytest.raises(IntegrityError, match="inflates beyond"):
        decode(bomb)
    with pytest.raises(IntegrityError, match="truncated"):
        decode(blob[: len(blob) // 2])
