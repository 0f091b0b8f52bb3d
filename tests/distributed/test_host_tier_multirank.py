"""The host tier in a 2-rank gloo world: a step is restored from host memory only when
every rank holds it (agreed through the coordinator, or, when a rank's snapshot needs
another's tensors, through the memory restore); otherwise restore falls through to the disk
tiers, on every rank alike."""

from __future__ import annotations

import torch

from tests.distributed.harness import run_world


def _state(rank: int, v: float) -> dict[str, object]:
    return {"w": torch.full((256,), v + 1000 * rank), "n": int(v)}  # rank-local entries


def _host_world(
    rank: int, world: int, root: str, drop_on_rank1: int | None, replicated_entry: bool
) -> dict:
    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec
    from recoverkit.staging.host_tier import HostTier
    from recoverkit.state.sharded import replicated

    tiers = [TierSpec.host(keep=3), TierSpec.local(every_steps=2)]
    opts = CheckpointOptions(
        capture_rng=False, tiers=tiers, staging=StagingPolicy(budget_bytes=16 << 20)
    )
    with Checkpointer(root, options=opts) as ckpt:
        for step in (1, 2, 3):
            state = _state(rank, step)
            if replicated_entry:
                state["shared"] = replicated({"b": torch.full((8,), float(step))})
            assert ckpt.save_async(step, state).wait(60)
        host = ckpt.tiers["host"]
        assert isinstance(host, HostTier)
        assert host.held() == [1, 2, 3]
        if rank == 1 and drop_on_rank1 is not None:
            host.withdraw(host.snapshot(drop_on_rank1))  # this rank lost that snapshot
        dist.barrier()
        back = _state(rank, 0)
        if replicated_entry:
            back["shared"] = replicated({"b": torch.zeros(8)})
        restored = ckpt.restore(back)
        source = ckpt.tiers["host"].steps()
        assert torch.equal(back["w"], torch.full((256,), float(restored) + 1000 * rank))
    return {"step": int(restored), "agreed": source}


def test_a_step_every_rank_holds_in_memory_is_restored_from_memory(tmp_path):
    # step 3 is on no disk (local every 2 steps): only host memory can give it back
    out = run_world(2, _host_world, str(tmp_path / "ckpt"), None, False)
    assert [o["step"] for o in out] == [3, 3]
    assert [o["agreed"] for o in out] == [[1, 2, 3], [1, 2, 3]]


def test_a_step_one_rank_lost_falls_through_to_disk_on_every_rank(tmp_path):
    out = run_world(2, _host_world, str(tmp_path / "ckpt"), 3, False)
    assert [o["step"] for o in out] == [2, 2]  # rank 0 still holds 3, but rank 1 does not
    assert [o["agreed"] for o in out] == [[1, 2], [1, 2]]


def test_snapshots_that_need_another_ranks_tensors_are_restored_from_memory_across_ranks(tmp_path):
    # a replicated entry is written by one owner rank: the other's snapshot lacks it, so the
    # tier alone offers nothing, and the memory restore brings the owner's bytes over
    out = run_world(2, _host_world, str(tmp_path / "ckpt"), None, True)
    assert [o["step"] for o in out] == [3, 3]
    assert [o["agreed"] for o in out] == [[], []]


def _timed_schedule(rank: int, world: int) -> list:
    from recoverkit.config import TierSpec
    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.staging.schedule import Schedule

    # each rank's clock runs differently: rank 1's says no time has passed at all
    now = [0.0]
    specs = [TierSpec.local(every_steps=None, every_s=10.0), TierSpec(kind="p", every_steps=2)]
    sched = Schedule(
        specs, coordinator=default_coordinator(timeout_s=30), scope="t", clock=lambda: now[0]
    )
    out = []
    for step in (1, 2, 3, 4):
        if rank == 0:
            now[0] += 6.0
        out.append(sched.due(step))
    return out


def test_a_time_schedule_is_decided_by_rank_0_for_every_rank():
    out = run_world(2, _timed_schedule)
    assert out[0] == out[1]  # whatever each rank's clock says
    assert out[0] == [("local",), ("p",), ("local",), ("p",)]


def _restore_on_rank0_only(rank: int, world: int, root: str) -> int | None:
    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions

    # a commit timeout longer than the world's: an exchange rank 1 never joins would fail it
    opts = CheckpointOptions(capture_rng=False, commit_timeout_s=900.0)
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save(1, _state(rank, 1))
        restored = None
        if rank == 0:  # no lazy save staged: nothing in memory anywhere, so no agreement
            back = _state(rank, 0)
            restored = int(ckpt.restore(back))
        dist.barrier()
    return restored


def test_a_restore_without_lazy_saves_needs_no_other_rank(tmp_path):
    assert run_world(2, _restore_on_rank0_only, str(tmp_path / "ckpt"), timeout_s=170) == [1, None]
