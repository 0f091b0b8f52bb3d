"""The host tier restores from memory in a job of several ranks (issue 11's last gap).

2 ranks of DDP (gloo): the replicated parameters and optimizer state are staged by one owner
rank each, so neither rank's host snapshot restores it alone. With the tiers [host, local
every 10], steps 1..12 saved with save_async: the disk holds step 10, host memory step 12.
A restore mid-run (every rank) comes from memory: each rank's own snapshot, the other owner's
regions over the peer transport, bit-exact, no disk read. A byte flipped in one rank's pool
refuses the step on every rank alike and the disk is used, with a warning naming the copy. A
new Checkpointer (nothing staged in its process) goes to the disk without an exchange; a
world of one restores from the host tier directly; a mixed list (host, shm, disk) too.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.test_memory_restore_ddp import _capture_log, _diff, _make, _snapshot, _train


def _options(kinds: str):
    from recoverkit import CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec

    tiers = {"host": [TierSpec.host()], "host+shm": [TierSpec.host(), TierSpec.shm()]}[kinds]
    return CheckpointOptions(
        capture_rng=False, tiers=[*tiers, TierSpec.local(every_steps=10)], staging=StagingPolicy(budget_bytes=32 << 20)
    )


def _flip_own_snapshot(ckpt, step: int) -> str:
    """Flip one byte of this rank's first non-empty staged shard of ``step``; its key."""
    host = ckpt.tiers["host"]
    snap = host.snapshot(step)
    shard, offset, nbytes, _ = next(e for e in snap.entries if e[2] > 0)
    byte = host._pool_of(snap).view(offset + nbytes // 2, 1)
    byte[0] ^= 0xFF
    return shard.key


def _job(rank: int, world: int, root: str, shm_dir: str, kinds: str, damage: bool) -> dict:
    import warnings

    import torch.distributed as dist

    os.environ["RECOVERKIT_SHM_DIR"] = shm_dir
    from recoverkit import Checkpointer

    model, opt = _make(rank)
    extra = {"x": torch.zeros(16)}
    state = {"model": model, "optim": opt, "extra": extra}
    ckpt = Checkpointer(root, options=_options(kinds))
    saved: dict[int, dict] = {}
    for step in range(1, 13):
        _train(model, opt, rank, step)
        extra["x"] = torch.full((16,), float(100 * rank + step))
        ckpt.save_async(step, state)
        if step in (10, 12):
            saved[step] = _snapshot(model, opt, extra)
    ckpt.wait()
    out: dict = {"disk": ckpt.tiers["local"].steps(), "host": ckpt.tiers["host"].held()}
    flipped = _flip_own_snapshot(ckpt, 12) if damage and rank == 1 else None
    dist.barrier()
    reads: list[int] = []
    local = ckpt.tiers["local"]
    disk_read = local.read
    local.read = lambda step, requests: (reads.append(step), disk_read(step, requests))[1]  # counts disk reads
    messages = _capture_log()
    for _ in range(3):  # move on, then come back
        _train(model, opt, rank, 99)
    extra["x"] = torch.zeros(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["step"] = step = int(ckpt.restore(state))
    out["diff"] = _diff(_snapshot(model, opt, state["extra"]), saved[step])
    out["log"] = [m for m in messages if "restored step" in m]
    out["disk_reads"] = reads
    out["warnings"] = [str(w.message) for w in caught]
    out["flipped"] = flipped
    ckpt.close()
    # a new Checkpointer holds nothing in host memory: the disk, at once, on every rank
    with Checkpointer(root, options=_options("host")) as again:
        model2, opt2 = _make(rank)
        state2 = {"model": model2, "optim": opt2, "extra": {"x": torch.zeros(16)}}
        out["after_restart"] = int(again.restore(state2))
        out["restart_diff"] = _diff(_snapshot(model2, opt2, state2["extra"]), saved[10])
    return out


@pytest.mark.parametrize("kinds", ["host", "host+shm"])
def test_a_ddp_job_restores_mid_run_from_host_memory(tmp_path, kinds):
    out = run_world(2, _job, str(tmp_path / "ckpt"), str(tmp_path / "shm"), kinds, False)
    for r, o in enumerate(out):
        assert o["disk"] == [10] and o["host"] == [12]
        assert o["step"] == 12 and o["diff"] == [], o
        assert o["log"] and "with memory restore" in o["log"][0], o["log"]
        assert o["disk_reads"] == [], "restored from memory without reading the disk"
        if kinds == "host":  # the other owner's regions from its host memory, over the transport
            assert f"rank {r}'s snapshot from own host memory" in o["log"][0], o["log"]
            assert f"rank {1 - r}'s snapshot from the host memory of rank {1 - r} via rank {1 - r}" in o["log"][0]
        assert o["after_restart"] == 10 and o["restart_diff"] == []
    assert not [f for _, _, fs in os.walk(tmp_path / "shm") for f in fs]


def test_a_damaged_host_snapshot_is_refused_on_every_rank_and_the_disk_used(tmp_path):
    out = run_world(2, _job, str(tmp_path / "ckpt"), str(tmp_path / "shm"), "host", True)
    assert out[1]["flipped"]
    for o in out:
        assert o["step"] == 10 and o["diff"] == [], o
        assert o["log"] and "with tier fallback" in o["log"][0], o["log"]
        assert o["disk_reads"] and set(o["disk_reads"]) == {10}
        named = [w for w in o["warnings"] if "rank 1's snapshot from" in w and "host memory" in w]
        assert named and any("crc" in w for w in named), o["warnings"]


def _single(rank: int, world: int, root: str) -> dict:
    from recoverkit import Checkpointer

    model, opt = _make(rank)
    extra = {"x": torch.zeros(16)}
    state = {"model": model, "optim": opt, "extra": extra}
    messages = _capture_log()
    with Checkpointer(root, options=_options("host")) as ckpt:
        for step in range(1, 13):
            _train(model, opt, rank, step)
            extra["x"] = torch.full((16,), float(step))
            ckpt.save_async(step, state)
        ckpt.wait()
        want = _snapshot(model, opt, extra)
        _train(model, opt, rank, 99)
        step = int(ckpt.restore(state))
        diff = _diff(_snapshot(model, opt, state["extra"]), want)
    return {"step": step, "diff": diff, "log": [m for m in messages if "restored step" in m]}


def test_a_world_of_one_restores_from_the_host_tier_directly(tmp_path):
    (o,) = run_world(1, _single, str(tmp_path / "ckpt"))
    assert o["step"] == 12 and o["diff"] == []
    assert o["log"] and "with tier fallback from host snapshot of step 12" in o["log"][0], o["log"]


def _alone(rank: int, world: int, root: str) -> dict:
    from recoverkit import Checkpointer

    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 4))  # rank-local state
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = {"model": model, "optim": opt, "extra": {"x": torch.zeros(16)}}
    messages = _capture_log()
    with Checkpointer(root, options=_options("host")) as ckpt:
        for step in range(1, 13):
            _train(model, opt, rank, step)
            state["extra"]["x"] = torch.full((16,), float(100 * rank + step))
            ckpt.save_async(step, state)
        ckpt.wait()
        want = _snapshot(model, opt, state["extra"])
        _train(model, opt, rank, 99)
        step = int(ckpt.restore(state))
        diff = _diff(_snapshot(model, opt, state["extra"]), want)
    return {"step": step, "diff": diff, "log": [m for m in messages if "restored step" in m]}


def test_snapshots_that_restore_their_rank_alone_move_nothing_between_ranks(tmp_path):
    out = run_world(2, _alone, str(tmp_path / "ckpt"))
    for r, o in enumerate(out):
        assert o["step"] == 12 and o["diff"] == []
        assert o["log"] and "with memory restore" in o["log"][0], o["log"]
        assert f"rank {r}'s snapshot from own host memory" in o["log"][0] and "via rank" not in o["log"][0]
