"""Ranks on two "hosts", each with its own node-local root: every host commits the step on
its own disk with its own ranks' segment files, keeps its own retention, and restores its
ranks from its own disk; a failed save leaves no temporary bytes on either host."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.harness import run_world

ROWS = 12  # split evenly over 1, 2, 3 or 4 ranks: the shards cover the tensor


def _root(base: str, rank: int) -> str:
    return os.path.join(base, "host-a" if rank < 2 else "host-b")


def _state(rank: int, world: int, value: float):
    from recoverkit import ShardedTensor

    per = ROWS // world
    return {
        "w": ShardedTensor(torch.full((per, 3), value + rank), (ROWS, 3), (rank * per, 0)),
        "mine": torch.full((4,), value * 10 + rank),
        "note": f"rank {rank} value {value}",
    }


def _save(rank, world, base):
    from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy

    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=2))
    with Checkpointer(_root(base, rank), options=opts) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(rank, world, float(step)))
    return True


def _restore(rank, world, base):
    from recoverkit import Checkpointer

    per = ROWS // world
    state = _state(rank, world, 0.0)
    state["note"] = None
    with Checkpointer(_root(base, rank)) as ckpt:
        step = ckpt.restore(state)
    expect = _state(rank, world, 3.0)
    assert torch.equal(state["w"].local, expect["w"].local), rank
    assert torch.equal(state["mine"], expect["mine"]) and state["note"] == expect["note"]
    assert state["w"].local.shape[0] == per
    return step


def _failing_save(rank, world, base):
    from recoverkit import Checkpointer, CheckpointOptions, CommitError, RetentionPolicy
    from recoverkit.storage.faults import FaultInjector

    faults = FaultInjector().fail_at(phase="after_data", step=4, rank=3)
    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=2), commit_timeout_s=20)
    with Checkpointer(_root(base, rank), options=opts, faults=faults) as ckpt:
        with pytest.raises(CommitError):
            ckpt.save(4, _state(rank, world, 4.0))
    return True


def test_each_host_commits_and_restores_from_its_own_disk(tmp_path):
    base = str(tmp_path)
    run_world(4, _save, base)
    for host, ranks in (("host-a", (0, 1)), ("host-b", (2, 3))):
        root = os.path.join(base, host)
        names = sorted(os.listdir(root))
        assert [n for n in names if n.startswith("step-")] == ["step-000000002", "step-000000003"], (host, names)
        assert not [n for n in names if n.startswith(".tmp")], (host, names)
        segs = sorted(f for f in os.listdir(os.path.join(root, "step-000000003")) if f.endswith(".seg"))
        assert segs == [f"rank-{r:05d}.seg" for r in ranks], (host, segs)
        with open(os.path.join(root, "latest")) as f:
            assert f.read().strip() == "step-000000003"
    assert run_world(4, _restore, base) == [3, 3, 3, 3]

    run_world(4, _failing_save, base)
    for host in ("host-a", "host-b"):
        names = sorted(os.listdir(os.path.join(base, host)))
        assert [n for n in names if n.startswith("step-")] == ["step-000000002", "step-000000003"], (host, names)
        assert not [n for n in names if n.startswith(".tmp")], (host, names)
