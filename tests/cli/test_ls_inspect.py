"""`recoverkit ls` and `recoverkit inspect` through a real subprocess."""

from __future__ import annotations

import json
import os

import pytest

from recoverkit import Checkpointer, CheckpointOptions, TierPolicy
from tests.cli.helpers import cli, cli_json, segment, train_and_save
from tests.models import Trainer


def test_ls_lists_steps_newest_first_with_state_size_and_age(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root)
    doc = cli_json("ls", root)
    assert [s["step"] for s in doc["steps"]] == [3, 2, 1]
    assert doc["latest"] == 3 and doc["steps"][0]["latest"]
    local = doc["steps"][0]["tiers"]["local"]
    assert local["state"] == "committed"
    assert local["nbytes"] == os.path.getsize(segment(root, 3))
    assert 0 <= doc["steps"][0]["age_s"] < 600
    assert doc["lock"] is None
    human = cli("ls", root)
    assert human.returncode == 0 and "(latest)" in human.stdout and "committed" in human.stdout


def test_ls_shows_damage_and_the_live_lock_holder(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root)
    with open(segment(root, 2), "r+b") as f:  # flip one byte inside a tensor
        f.seek(os.path.getsize(segment(root, 2)) - 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    os.truncate(segment(root, 1), 100)
    with Checkpointer(root):  # a live writer holds the run lock
        doc = cli_json("ls", root)
        assert doc["lock"] and f"pid {os.getpid()}" in doc["lock"]
    states = {s["step"]: s["tiers"]["local"]["state"] for s in doc["steps"]}
    assert states == {3: "committed", 2: "committed", 1: "damaged"}  # a flipped byte needs --verify
    p = cli("ls", root, "--verify", "--json")
    assert p.returncode == 1
    states = {s["step"]: s["tiers"]["local"]["state"] for s in json.loads(p.stdout)["steps"]}
    assert states == {3: "verified", 2: "corrupt", 1: "damaged"}


def test_ls_lists_the_persistent_tier(tmp_path):
    pytest.importorskip("tensorstore")
    root, url = str(tmp_path / "ckpt"), "file://" + str(tmp_path / "zarr")
    opts = CheckpointOptions(tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=2, host_keep=0))
    trainer = Trainer(seed=1)
    with Checkpointer(root, options=opts) as ckpt:
        for step in (1, 2):
            trainer.train_step()
            assert ckpt.save_async(step, trainer.state()).wait(60)
    doc = cli_json("ls", root, "--persistent", url)
    tiers = {s["step"]: sorted(s["tiers"]) for s in doc["steps"]}
    assert tiers == {2: ["local", "persistent"], 1: ["local"]}
    assert doc["steps"][0]["tiers"]["persistent"]["state"] == "committed"
    # the persistent store verifies through its own reader too
    assert cli("verify", url).returncode == 0


def test_inspect_step_dir_lists_tensors_shards_world_and_objects(tmp_path):
    root = str(tmp_path / "ckpt")
    trainer = train_and_save(root)
    doc = cli_json("inspect", os.path.join(root, "step-000000003"))
    assert doc["step"] == 3 and doc["world_size"] == 1
    emb = doc["tensors"]["model/embed.weight"]
    assert emb["dtype"] == "float32" and emb["shape"] == list(trainer.model.embed.weight.shape)
    shard = emb["shards"][0]
    assert shard["rank"] == 0 and shard["file"] == "rank-00000.seg" and shard["offsets"] == [0, 0]
    assert doc["tensors"]["model/head.weight"]["alias_of"] == "model/embed.weight"
    assert doc["world"] == [{"rank": 0, "file": "rank-00000.seg", "blob_nbytes": doc["world"][0]["blob_nbytes"],
                             "shards": sum(len(t.get("shards", [])) for t in doc["tensors"].values()),
                             "tensor_nbytes": doc["world"][0]["tensor_nbytes"]}]
    tree = doc["objects"]["tree"]
    assert tree["step"] == 3
    assert tree["optimizer"]["param_groups"][0]["lr"] == pytest.approx(trainer.optimizer.param_groups[0]["lr"])


def test_inspect_root_latest_prints_decoded_tree(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root)
    p = cli("inspect", root, "--step", "latest", "--shards")
    assert p.returncode == 0, p.stderr
    assert "step 3" in p.stdout
    assert "model/embed.weight" in p.stdout and "rank-00000.seg" in p.stdout
    assert "<tensor float32[61, 32] model/embed.weight>" in p.stdout  # the decoded object tree
    assert "'step': 3" in p.stdout
    assert cli_json("inspect", root, "--step", "1")["step"] == 1
