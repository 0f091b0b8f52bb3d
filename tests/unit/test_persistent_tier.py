"""Tier 3 through the Checkpointer: zarr v3 groups that zarr-python and tensorstore both open."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit.config import StagingPolicy, TierPolicy
from tests.models import Trainer, params_equal


def _opts(url, **kw):
    return CheckpointOptions(
        tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=2, host_keep=0, **kw),
        staging=StagingPolicy(budget_bytes=64 << 20),
    )


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_persistent_tier_round_trip_and_fallback(tmp_path, compression):
    url = "file://" + str(tmp_path / "zarr")
    local = str(tmp_path / "local")
    trainer = Trainer(seed=1)
    with Checkpointer(local, options=_opts(url, compression=compression)) as ckpt:
        for step in range(1, 5):
            trainer.train_step()
            h = ckpt.save_async(step, trainer.state())
            assert h.wait(60)
            assert set(h.tiers) == ({"local", "persistent"} if step % 2 == 0 else {"local"})
        assert ckpt.tiers["persistent"].steps() == [2, 4]
    expected = Trainer(seed=1)
    for _ in range(4):
        expected.train_step()
    shutil.rmtree(local)  # node-local disk lost: the persistent tier must serve the restore
    os.makedirs(local)
    with Checkpointer(local, options=_opts(url)) as ckpt:
        fresh = Trainer(seed=5)
        state = fresh.state()
        assert ckpt.restore(state) == 4
    assert params_equal(fresh.model, expected.model)


def _walk(group, prefix=""):
    """Every array under a zarr-python group, by path."""
    out = {}
    for name, node in group.members():
        if hasattr(node, "members"):
            out.update(_walk(node, prefix + name + "/"))
        else:
            out[prefix + name] = node
    return out


def test_zarr_python_reads_the_same_values(tmp_path):
    """The root and the step open as groups, tensor keys are nested groups and arrays, and
    walking everything with zarr-python warns about nothing."""
    zarr = pytest.importorskip("zarr")
    url = "file://" + str(tmp_path / "zarr")
    state = {
        "model": {"fc.weight": torch.randn(33, 7), "fc.bias": torch.randn(5).to(torch.bfloat16)},
        "i": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    }
    opts = CheckpointOptions(capture_rng=False, tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=1))
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        assert ckpt.save_async(1, state).wait(60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Object at manifest.json is not recognized ..." fails the test
        root = zarr.open_group(str(tmp_path / "zarr"), mode="r")
        step = root["step-000000001"]
        assert step.attrs["recoverkit"]["step"] == 1
        np.testing.assert_array_equal(step["model"]["fc.weight"][...], state["model"]["fc.weight"].numpy())
        np.testing.assert_array_equal(step["i"][...], state["i"].numpy())
        bf = step["model"]["fc.bias"]
        assert str(bf.dtype) == "uint16" and bf.attrs["recoverkit"]["dtype"] == "bfloat16"
        np.testing.assert_array_equal(bf[...], state["model"]["fc.bias"].view(torch.uint16).numpy())
        arrays = _walk(root)
        # the manifest and the object trees are raw-bytes arrays under .recoverkit
        manifest = bytes(arrays["step-000000001/.recoverkit/manifest"][...])
        assert json.loads(manifest)["step"] == 1
    assert {k for k in arrays if "/.recoverkit/" not in k} == {
        "step-000000001/model/fc.weight", "step-000000001/model/fc.bias", "step-000000001/i"}
    import tensorstore as ts  # and tensorstore, with a plain spec at the path a user would guess

    arr = ts.open({"driver": "zarr3", "kvstore": f"{url}/step-000000001/model/fc.weight/"}, open=True, read=True).result()
    np.testing.assert_array_equal(arr.read().result(), state["model"]["fc.weight"].numpy())


def test_colliding_and_odd_keys_get_distinct_documented_names(tmp_path):
    """A tensor ``a`` beside a tensor ``a/b``, and names zarr reserves, still round-trip and
    open with zarr-python under the documented escapes."""
    zarr = pytest.importorskip("zarr")
    url = "file://" + str(tmp_path / "zarr")
    state = {"a": torch.arange(5, dtype=torch.int32), "a/b": torch.arange(3.0), "__x": torch.ones(2),
             ".recoverkit": torch.zeros(1), "sp ace/é": torch.full((2,), 7)}
    opts = CheckpointOptions(capture_rng=False, tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=1))
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        assert ckpt.save_async(1, state).wait(60)
        manifest = ckpt.tiers["persistent"].manifest(1)
    files = {k: t.shards[0].file for k, t in manifest.tensors.items()}
    assert files == {"a": "a~", "a/b": "a/b", "__x": "~5f_x", ".recoverkit": "~2erecoverkit", "sp ace/é": "sp~20ace/~c3~a9"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = zarr.open_group(str(tmp_path / "zarr" / "step-000000001"), mode="r")
        np.testing.assert_array_equal(step["a~"][...], state["a"].numpy())
        np.testing.assert_array_equal(step["a"]["b"][...], state["a/b"].numpy())
        assert step["~5f_x"].attrs["recoverkit"]["key"] == "__x"
        _walk(step)
    shutil.rmtree(tmp_path / "local")
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        back = {k: torch.empty_like(v) for k, v in state.items()}
        assert ckpt.restore(back) == 1
    assert all(torch.equal(back[k], v) for k, v in state.items())


def _previous_layout_state():
    """The state tests/unit/data/zarr_previous_layout was saved from (by the flat layout)."""
    g = torch.Generator().manual_seed(7)
    return {"model": {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g).to(torch.bfloat16)},
            "a": torch.arange(5, dtype=torch.int32), "a/b": torch.arange(3, dtype=torch.int64), "step": 11, "note": "v1"}


def test_a_step_of_the_previous_flat_layout_still_restores(tmp_path):
    """Steps written before nesting (arrays flat under tensors/, blobs/*.json, manifest.json)
    are listed, verified and restored; the next save beside them uses the nested layout."""
    store = tmp_path / "zarr"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "zarr_previous_layout"), store)
    assert (store / "step-000000011" / "tensors" / "model~2ffc.weight" / "zarr.json").is_file()
    url = "file://" + str(store)
    opts = CheckpointOptions(capture_rng=False, tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=1))
    expected = _previous_layout_state()
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        assert ckpt.tiers["persistent"].steps() == [11]
        assert ckpt.tiers["persistent"].manifest(11).tensors["a"].shards[0].file == "tensors/a"
        fresh = {"model": {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4, dtype=torch.bfloat16)},
                 "a": torch.zeros(5, dtype=torch.int32), "a/b": torch.zeros(3, dtype=torch.int64), "step": 0, "note": None}
        assert ckpt.restore(fresh) == 11
        assert ckpt.save_async(12, fresh).wait(60)
        assert ckpt.tiers["persistent"].steps() == [11, 12]
    assert torch.equal(fresh["model"]["fc.weight"], expected["model"]["fc.weight"])
    assert torch.equal(fresh["model"]["fc.bias"], expected["model"]["fc.bias"])
    assert torch.equal(fresh["a"], expected["a"]) and torch.equal(fresh["a/b"], expected["a/b"])
    assert (fresh["step"], fresh["note"]) == (11, "v1")
    assert (store / "zarr.json").is_file() and (store / "step-000000012" / "model" / "fc.weight" / "zarr.json").is_file()
    shutil.rmtree(tmp_path / "local")  # the new step from the persistent tier too
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        again = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in fresh.items() if k != "model"}
        again["model"] = {k: torch.zeros_like(v) for k, v in fresh["model"].items()}
        assert ckpt.restore(again) == 12
    assert torch.equal(again["model"]["fc.weight"], expected["model"]["fc.weight"])


def test_restore_falls_through_host_local_persistent(tmp_path):
    """Every step goes to all three tiers; losing the local copy and then corrupting the
    persistent one makes restore fall back tier by tier, each time to verified bytes."""
    from recoverkit.storage.discovery import CheckpointSkippedWarning
    from recoverkit.storage.layout import step_dirname

    url = "file://" + str(tmp_path / "zarr")
    local = str(tmp_path / "local")
    opts = CheckpointOptions(
        tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=1, host_keep=1),
        staging=StagingPolicy(budget_bytes=64 << 20),
    )
    trainer = Trainer(seed=3)
    snapshots = {}
    with Checkpointer(local, options=opts) as ckpt:
        for step in (1, 2, 3):
            trainer.train_step()
            assert ckpt.save_async(step, trainer.state()).wait(60)
            snapshots[step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        assert ckpt.tiers["persistent"].steps() == [1, 2, 3]
        fresh = Trainer(seed=9)
        assert ckpt.restore(fresh.state()) == 3  # newest, from the host snapshot
        assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in snapshots[3].items())
    # a new process: no host snapshot; the local step 3 is gone -> persistent step 3
    shutil.rmtree(os.path.join(local, step_dirname(3)))
    with Checkpointer(local, options=opts) as ckpt:
        fresh = Trainer(seed=9)
        state = fresh.state()
        assert ckpt.restore(state) == 3
        assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in snapshots[3].items())
        assert state["step"] == 3
    # the persistent step 3 rots too: one chunk byte flipped -> skipped, local step 2 used
    arrays = tmp_path / "zarr" / step_dirname(3)
    chunks = sorted(p for p in arrays.rglob("c/*") if p.is_file() and p.stat().st_size > 64 and ".recoverkit" not in p.parts)
    assert chunks
    raw = bytearray(chunks[0].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunks[0].write_bytes(bytes(raw))
    with Checkpointer(local, options=opts) as ckpt:
        fresh = Trainer(seed=9)
        with pytest.warns(CheckpointSkippedWarning, match="(?s)step-000000003.*chunk c/"):
            assert ckpt.restore(fresh.state()) == 2
        assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in snapshots[2].items())


def test_sharded_world_layout_through_the_tier(tmp_path):
    """ZarrTier.prepare lays out arrays at their global shape from every rank's shards, and
    rank payloads written separately read back as the global tensor (zarr-python too)."""
    zarr = pytest.importorskip("zarr")
    from recoverkit.format.manifest import Manifest
    from recoverkit.state.dtypes import to_bytes_view
    from recoverkit.storage.base import RankPayload, ShardData, ShardMeta
    from recoverkit.storage.zarr_tier import ZarrTier

    full = torch.randn(64, 1024)
    tier = ZarrTier("file://" + str(tmp_path / "zarr"))
    halves = [((0, 0), (32, 1024)), ((32, 0), (32, 1024))]
    layout = [ShardMeta("w", "float32", (64, 1024), o, s) for o, s in halves]
    staging = tier.prepare(5, layout)
    records = []
    for rank, (o, s) in enumerate(halves):
        part = full[o[0] : o[0] + s[0]].contiguous()
        shard = ShardData("w", "float32", (64, 1024), o, s, to_bytes_view(part))
        records.append(tier.write_rank(staging, RankPayload(rank, b"{}", [shard])))
    assert tier.steps() == []  # nothing selectable before the manifest
    a = zarr.open_array(str(tmp_path / "zarr" / staging / "w"), mode="r")
    np.testing.assert_array_equal(a[...], full.numpy())
    assert a.chunks == (32, 1024)
    from recoverkit.format.manifest import TensorRecord

    shards = tuple(sh for r in records for _, sh in r.shards)
    files = {name: size for r in records for name, size in r.files.items()}
    manifest = Manifest(step=5, run_id="r", world_size=2, blobs=tuple(r.blob for r in records), files=files,
                        tensors={"w": TensorRecord("w", "float32", (64, 1024), shards)})
    tier.commit(5, staging, manifest)
    assert tier.steps() == [5]
    tier.delete(5)
    assert tier.steps() == [] and not (tmp_path / "zarr" / staging).exists()
