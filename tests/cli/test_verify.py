"""`recoverkit verify`: a full checksum pass that names every fault."""

from __future__ import annotations

import json
import os

from recoverkit.format.manifest import Manifest
from tests.cli.helpers import cli, cli_json, segment, train_and_save


def _manifest(root: str, step: int) -> Manifest:
    with open(os.path.join(root, f"step-{step:09d}", "manifest.json"), "rb") as f:
        return Manifest.from_bytes(f.read())


def test_verify_passes_on_intact_steps_and_reports_rate(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root)
    doc = cli_json("verify", root)
    assert doc["ok"] and [s["step"] for s in doc["steps"]] == [1, 2, 3]
    m = _manifest(root, 3)
    shards = [s for t in m.tensors.values() for s in t.shards]
    packs = {s.pack for s in shards if s.pack is not None}  # small tensors: checked by pack
    regions = [*m.blobs, *packs, *(s for s in shards if s.pack is None)]
    assert packs and doc["steps"][2]["nbytes"] == sum(r.nbytes for r in regions)
    assert doc["steps"][2]["pieces"] == len(regions)
    p = cli("verify", os.path.join(root, "step-000000002"))
    assert p.returncode == 0 and "GB/s" in p.stdout and "all steps verify" in p.stdout


def test_verify_names_a_flipped_byte(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root)
    m = _manifest(root, 2)
    key = "model/encoder.layers.1.linear2.weight"
    shard = m.tensors[key].shards[0]
    with open(segment(root, 2), "r+b") as f:
        f.seek(shard.offset + shard.nbytes // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    p = cli("verify", root)
    assert p.returncode == 1
    assert "FAILED" in p.stdout and "1 of 3 step(s) FAILED" in p.stdout
    assert "rank-00000.seg" in p.stderr
    assert f"expected crc32c 0x{shard.crc32c:08x}, found crc32c 0x" in " ".join(p.stderr.split())
    # a small tensor is checked by its pack: the fault names the pack's first and last keys
    named = key if shard.pack is None else "pack of"
    assert named in p.stderr
    doc = json.loads(cli("verify", root, "--json").stdout)
    bad = [s for s in doc["steps"] if not s["ok"]]
    assert [s["step"] for s in bad] == [2] and len(bad[0]["faults"]) == 1
    assert named in bad[0]["faults"][0]["item"]


def test_verify_names_a_truncated_file(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1,))
    size = os.path.getsize(segment(root, 1))
    os.truncate(segment(root, 1), size - 5000)
    p = cli("verify", os.path.join(root, "step-000000001"))
    assert p.returncode == 1
    assert f"file size: expected {size} bytes, found {size - 5000} bytes" in p.stderr
    assert "truncated" in p.stderr
    os.remove(segment(root, 1))
    p = cli("verify", root, "--json")
    assert p.returncode == 1
    faults = json.loads(p.stdout)["steps"][0]["faults"]
    assert any(f["found"] == "no such file" for f in faults)
