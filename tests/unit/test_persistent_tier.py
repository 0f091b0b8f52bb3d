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
