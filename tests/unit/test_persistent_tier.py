"""Tier 3 through the Checkpointer: zarr v3 groups that zarr-python and tensorstore both open."""

from __future__ import annotations

import os
import shutil

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


def test_zarr_python_reads_the_same_values(tmp_path):
    zarr = pytest.importorskip("zarr")
    url = "file://" + str(tmp_path / "zarr")
    state = {
        "w": torch.randn(33, 7),
        "b": torch.randn(5).to(torch.bfloat16),
        "i": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    }
    opts = CheckpointOptions(capture_rng=False, tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=1))
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        assert ckpt.save_async(1, state).wait(60)
    group = zarr.open_group(str(tmp_path / "zarr" / "step-000000001"), mode="r")
    arrays = {}

    def collect(g, prefix=""):
        for name, a in g.arrays():
            arrays[prefix + name] = a
        for name, sub in g.groups():
            collect(sub, prefix + name + "/")

    collect(group)
    by_dtype = {str(a.attrs.get("recoverkit", {}).get("dtype", a.dtype)): a for a in arrays.values()}
    np.testing.assert_array_equal(by_dtype["float32"][...], state["w"].numpy())
    np.testing.assert_array_equal(by_dtype["int64"][...], state["i"].numpy())
    bf = by_dtype["bfloat16"]
    assert str(bf.dtype) == "uint16"
    np.testing.assert_array_equal(bf[...], state["b"].view(torch.uint16).numpy())


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
    arrays = tmp_path / "zarr" / step_dirname(3) / "tensors"
    chunks = sorted(p for p in arrays.rglob("c/*") if p.is_file() and p.stat().st_size > 64)
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
    a = zarr.open_array(str(tmp_path / "zarr" / staging / "tensors" / "w"), mode="r")
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
