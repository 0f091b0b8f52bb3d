"""Real gloo worlds: DDP saves written once, resharding, lazy saves, a rank killed mid-save."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.distributed.harness import run_world

ROWS, COLS = 37, 6  # rows do not divide evenly by 3 or 4


def _full():
    return torch.arange(ROWS * COLS, dtype=torch.float64).reshape(ROWS, COLS) * 1.5


def _bounds(world, rank):
    per = -(-ROWS // world)
    lo = min(ROWS, rank * per)
    return lo, min(ROWS, lo + per)


def _sharded_state(rank, world):
    from recoverkit.state.sharded import ShardedTensor

    lo, hi = _bounds(world, rank)
    full = _full()
    flat = torch.arange(100, dtype=torch.bfloat16)
    flo, fhi = rank * 100 // world, (rank + 1) * 100 // world
    return {
        "w": ShardedTensor(full[lo:hi].clone(), (ROWS, COLS), (lo, 0)),
        "opt": {"flat": ShardedTensor(flat[flo:fhi].clone(), (100,), (flo,))},
        "rank_note": f"rank {rank}",
    }


def _save_sharded(rank, world, root):
    from recoverkit import Checkpointer

    with Checkpointer(root) as ckpt:
        ckpt.save(5, _sharded_state(rank, world))
    return True


def _restore_sharded(rank, world, root):
    from recoverkit import Checkpointer
    from recoverkit.state.sharded import ShardedTensor

    lo, hi = _bounds(world, rank)
    flo, fhi = rank * 100 // world, (rank + 1) * 100 // world
    state = {
        "w": ShardedTensor(torch.zeros(hi - lo, COLS, dtype=torch.float64), (ROWS, COLS), (lo, 0)),
        "opt": {"flat": ShardedTensor(torch.zeros(fhi - flo, dtype=torch.bfloat16), (100,), (flo,))},
        "rank_note": None,
    }
    with Checkpointer(root) as ckpt:
        assert ckpt.restore(state) == 5
    assert torch.equal(state["w"].local, _full()[lo:hi]), rank
    assert torch.equal(state["opt"]["flat"].local, torch.arange(100, dtype=torch.bfloat16)[flo:fhi])
    return state["rank_note"]


@pytest.mark.parametrize("saved,restored", [(4, 3), (4, 2), (4, 1), (1, 4), (2, 3)])
def test_reshard_matrix_is_bit_exact(tmp_path, saved, restored):
    root = str(tmp_path / "ckpt")
    if saved == 1:
        _save_one(root)
    else:
        run_world(saved, _save_sharded, root)
    if restored == 1:
        notes = [_restore_one(root)]
    else:
        notes = run_world(restored, _restore_sharded, root)
    for r, note in enumerate(notes):
        assert note == f"rank {r if r < saved else 0}"


def _save_one(root):
    from recoverkit import Checkpointer

    with Checkpointer(root) as ckpt:
        ckpt.save(5, _sharded_state(0, 1))


def _restore_one(root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _restore_sharded(0, 1, root)


def _ddp_train_save(rank, world, root, lazy):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierPolicy

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(rank)
    opts = CheckpointOptions(tiers=TierPolicy(local_every=1, host_keep=0))
    with Checkpointer(root, options=opts) as ckpt:
        for step in range(1, 5):
            x = torch.randn(16, 64, generator=data)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 2:
                state = {"model": model, "optimizer": opt}
                if lazy:
                    handle = ckpt.save_async(step, state)
                else:
                    ckpt.save(step, state)
                saved = {k: v.clone() for k, v in model.module.state_dict().items()}
        if lazy:
            assert handle.wait(60)
    dist.barrier()
    return {k: v.tolist() for k, v in saved.items()}


@pytest.mark.parametrize("lazy", [False, True], ids=["sync", "lazy"])
def test_ddp_state_written_once_and_restored_in_one_process(tmp_path, lazy):
    from recoverkit import Checkpointer

    root = str(tmp_path / "ckpt")
    saved = run_world(2, _ddp_train_save, root, lazy)
    assert saved[0] == saved[1]
    import warnings

    with Checkpointer(root) as ckpt:
        manifest = ckpt.manifest(2)
        shards = {k: t.shards for k, t in manifest.tensors.items() if not k.startswith("rank-")}
        assert all(len(s) == 1 for s in shards.values())  # replicated: written once
        assert {s[0].rank for s in shards.values()} == {0, 1}  # ...by owners spread over ranks
        assert any(k.startswith("rank-00001/__rng__") for k in manifest.tensors)  # rank-local
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ckpt.restore({"model": model, "optimizer": opt}) == 2
    got = {k: v.tolist() for k, v in model.state_dict().items()}
    assert got == saved[0]
    assert len(opt.state) == 4


def _kill_mid_save(rank, world, root):
    from recoverkit import Checkpointer, CheckpointOptions, CommitError
    from recoverkit.storage.faults import FaultInjector

    faults = FaultInjector().kill_at(phase="after_data", step=2, rank=1)
    opts = CheckpointOptions(commit_timeout_s=5.0)
    with Checkpointer(root, options=opts, faults=faults) as ckpt:
        ckpt.save(1, {"x": torch.full((1000,), float(rank))})
        t0 = time.monotonic()
        try:
            ckpt.save(2, {"x": torch.full((1000,), 10.0 + rank)})
        except CommitError as e:
            return {"error": str(e), "seconds": time.monotonic() - t0, "latest": ckpt.latest()}
    return {"error": None}


def test_rank_killed_mid_save_fails_commit_within_timeout(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_world(2, _kill_mid_save, root, final_barrier=False, timeout_s=120)
    assert results[1] is None  # rank 1 died (SIGKILL) without reporting
    r0 = results[0]
    assert r0["error"] and "rank 1" in r0["error"]
    assert r0["seconds"] < 5.0 + 10.0
    assert r0["latest"] == 1
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]
    assert sorted(os.listdir(root)).count("step-000000002") == 0

