"""A real 2-rank gloo world: the blocking save commits each step to every tier the policy
names (the persistent tier's layout gathered from both ranks), and every rank's steps()
agrees with a fresh reader's."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.distributed.harness import run_world

ROWS, COLS = 10, 3


def _full() -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)


def _opts(url: str):  # type: ignore[no-untyped-def]
    from recoverkit import CheckpointOptions, TierSpec

    tiers = [TierSpec.local(every_steps=1), TierSpec.persistent(url, every_steps=2)]  # no host tier
    return CheckpointOptions(capture_rng=False, commit_timeout_s=60, tiers=tiers)


def _save(rank: int, world: int, root: str, url: str) -> dict[str, object]:
    from recoverkit import Checkpointer
    from recoverkit.state.sharded import ShardedTensor

    lo, hi = rank * ROWS // world, (rank + 1) * ROWS // world
    out: dict[str, object] = {}
    with Checkpointer(root, options=_opts(url)) as ckpt:
        for step in (1, 2, 3):
            state = {"w": ShardedTensor(_full()[lo:hi] * step, (ROWS, COLS), (lo, 0)), "step": step}
            out[f"committed_to/{step}"] = list(ckpt.save(step, state).committed_to)
        out["steps"] = ckpt.steps()
        out["latest"] = ckpt.latest()
        out["held"] = {name: tier.steps() for name, tier in ckpt.tiers.items()}
    return out


def test_two_ranks_block_save_to_every_tier_due(tmp_path):
    pytest.importorskip("tensorstore")
    from recoverkit import CheckpointReader

    root, url = str(tmp_path / "local"), "file://" + str(tmp_path / "zarr")
    results = run_world(2, _save, root, url, timeout_s=240)
    for r in results:
        assert r["committed_to/1"] == r["committed_to/3"] == ["local"]
        assert r["committed_to/2"] == ["local", "persistent"]
        assert r["held"] == {"local": [1, 2, 3], "persistent": [2]}
        assert r["steps"] == [1, 2, 3] and r["latest"] == 3
    assert CheckpointReader(root, persistent_url=url).steps() == [1, 2, 3]
    shutil.rmtree(root)  # the node-local copy is lost: step 2 comes back from the persistent tier
    back = {"w": torch.zeros(ROWS, COLS), "step": None}
    assert CheckpointReader(persistent_url=url).restore(back) == 2
    assert torch.equal(back["w"], _full() * 2) and back["step"] == 2
