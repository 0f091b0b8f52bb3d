"""The shm tier in a 2-rank gloo world: new processes on the same node agree at start-up on
the steps every rank holds in shared memory and restores from its own alone; a step one
rank lost, or one a rank cannot restore alone, comes from the disk on every rank alike."""

from __future__ import annotations

import os

import pytest
import torch

from recoverkit.storage.shm import ShmStore
from tests.distributed.harness import run_world


def _options():
    from recoverkit import CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec

    tiers = [TierSpec.shm(), TierSpec.local(every_steps=2)]
    return CheckpointOptions(capture_rng=False, tiers=tiers, staging=StagingPolicy(budget_bytes=16 << 20))


def _state(rank: int, v: float, shared: bool) -> dict:
    from recoverkit.state.sharded import replicated

    state: dict = {"w": torch.full((256,), v + 1000 * rank), "n": int(v)}
    if shared:
        state["shared"] = replicated({"b": torch.full((8,), float(v))})
    return state


def _save(rank: int, world: int, root: str, shared: bool) -> list[int]:
    from recoverkit import Checkpointer

    ckpt = Checkpointer(root, options=_options())
    for step in (1, 2, 3):
        assert ckpt.save_async(step, _state(rank, step, shared)).wait(60)
    held = ckpt.tiers["shm"].slots.steps()
    ckpt.close(keep_snapshots=True)  # as a crash leaves them
    return held


def _restore(rank: int, world: int, root: str, shared: bool) -> dict:
    from recoverkit import Checkpointer

    with Checkpointer(root, options=_options()) as ckpt:
        back = _state(rank, 0, shared)
        step = int(ckpt.restore(back))
        agreed = ckpt.tiers["shm"].steps()
        assert torch.equal(back["w"], torch.full((256,), float(step) + 1000 * rank))
    return {"step": step, "agreed": agreed}


@pytest.mark.parametrize("case", ["all", "rank1-lost-3", "not-self-contained"])
def test_a_restarted_world_restores_what_every_rank_holds(tmp_path, monkeypatch, case):
    shm = str(tmp_path / "shm")
    monkeypatch.setenv("RECOVERKIT_SHM_DIR", shm)
    monkeypatch.setenv("RECOVERKIT_NODE", "node-0")
    root = str(tmp_path / "ckpt")
    shared = case == "not-self-contained"
    assert run_world(2, _save, root, shared) == [[2, 3], [2, 3]]
    if case == "rank1-lost-3":
        ShmStore(root).slots(1).invalidate(3)
    out = run_world(2, _restore, root, shared)
    if case == "all":  # step 3 is on no disk (local every 2 steps): shared memory gives it back
        assert out == [{"step": 3, "agreed": [2, 3]}] * 2
    elif case == "rank1-lost-3":
        assert out == [{"step": 2, "agreed": [2]}] * 2
    else:  # a replicated tensor another rank owns: no rank restores from its own memory alone
        assert [o["agreed"] for o in out] == [[], []]
        # ... but the memory restore across ranks (recovery.memory) reads the other rank's part
        # from this node's shared memory: still step 3, on every rank alike
        assert [o["step"] for o in out] == [3, 3]
    assert ShmStore.jobs(shm) == [] and os.listdir(shm) == []  # closed normally: nothing left
