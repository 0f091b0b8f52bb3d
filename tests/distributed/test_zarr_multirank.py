"""A real 2-rank gloo world writes sharded tensors to tier 3; a 3-rank world restores them
from it after the local copy is lost, and zarr-python sees the global arrays."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from tests.distributed.harness import run_world

ROWS, COLS = 37, 6  # 19 + 18 rows: a small array both ranks share one chunk of
BIG = (8192, 8)  # 128 KiB per rank: aligned chunks, each rank writes only its own


def _full():
    return torch.arange(ROWS * COLS, dtype=torch.float64).reshape(ROWS, COLS) * 1.5


def _big():
    return torch.arange(BIG[0] * BIG[1], dtype=torch.float32).reshape(BIG)


def _bounds(n, world, rank):
    per = -(-n // world)
    lo = min(n, rank * per)
    return lo, min(n, lo + per)


def _opts(url):
    from recoverkit import CheckpointOptions
    from recoverkit.config import TierPolicy

    return CheckpointOptions(capture_rng=False, tiers=TierPolicy(local_every=1, persistent_url=url, persistent_every=1, compression="zstd"))


def _save(rank, world, root, url):
    from recoverkit import Checkpointer
    from recoverkit.state.sharded import ShardedTensor

    lo, hi = _bounds(ROWS, world, rank)
    blo, bhi = _bounds(BIG[0], world, rank)
    state = {
        "w": ShardedTensor(_full()[lo:hi].clone(), (ROWS, COLS), (lo, 0)),
        "big": ShardedTensor(_big()[blo:bhi].clone(), BIG, (blo, 0)),
        "note": f"rank {rank}",
    }
    with Checkpointer(root, options=_opts(url)) as ckpt:
        handle = ckpt.save_async(3, state)
        assert handle.wait(120)
        assert set(handle.tiers) == {"local", "persistent"}, handle.tiers
        return ckpt.tiers["persistent"].steps()


def _restore(rank, world, root, url):
    from recoverkit import Checkpointer
    from recoverkit.state.sharded import ShardedTensor

    lo, hi = _bounds(ROWS, world, rank)
    blo, bhi = _bounds(BIG[0], world, rank)
    state = {
        "w": ShardedTensor(torch.zeros(hi - lo, COLS, dtype=torch.float64), (ROWS, COLS), (lo, 0)),
        "big": ShardedTensor(torch.zeros(bhi - blo, BIG[1]), BIG, (blo, 0)),
        "note": None,
    }
    with Checkpointer(root, options=_opts(url)) as ckpt:
        assert ckpt.restore(state) == 3
    assert torch.equal(state["w"].local, _full()[lo:hi]), rank
    assert torch.equal(state["big"].local, _big()[blo:bhi]), rank
    return state["note"]


def test_two_ranks_write_tier3_three_ranks_restore_from_it(tmp_path):
    zarr = pytest.importorskip("zarr")
    root, zroot = str(tmp_path / "local"), str(tmp_path / "zarr")
    url = "file://" + zroot
    assert run_world(2, _save, root, url) == [[3], [3]]

    step = os.path.join(zroot, "step-000000003")
    w = zarr.open_array(os.path.join(step, "w"), mode="r")
    big = zarr.open_array(os.path.join(step, "big"), mode="r")
    np.testing.assert_array_equal(w[...], _full().numpy())
    np.testing.assert_array_equal(big[...], _big().numpy())
    assert big.chunks == (4096, 8)  # one chunk per rank: nobody wrote the other's

    shutil.rmtree(os.path.join(root, "step-000000003"))  # node-local copy lost
    notes = run_world(3, _restore, root, url)
    assert notes == ["rank 0", "rank 1", "rank 0"]
