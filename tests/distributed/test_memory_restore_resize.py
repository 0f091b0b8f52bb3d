"""Restore from memory into a world of another size (issue 13's redistribution, and grow back).

A first gloo world of ``W_old`` ranks on simulated nodes saves a state with every kind of
tensor: a DDP model and its optimizer (replicated: each tensor written by one owner rank,
spread over the ranks), a :class:`~recoverkit.ShardedTensor` (a slice of rows per rank), a
``replicated`` entry and rank-local state. Step 5 is on the disk (the job's root); step 7
only in shared memory: each rank's own snapshot in its node's slots and a replica on the
other node (real slots of the real ShmStore holding the bytes and records of a real save,
as in ``test_memory_restore``); the same step 7 is also committed on a scratch disk root,
the reference. A second world of ``W_new`` ranks (same shared memory, same root) restores
through a CheckpointReader whose strategies are MemoryRestore then TierFallback, and
compares every tensor with a restore of step 7 from the scratch disk into the same new
sharding (the reader's resharding rules): bit-exact.

* 4 -> 3 (shrink), node b's memory lost: the old ranks 2 and 3 exist only as replicas on
  node a; the new rank 2 (node b) fetches everything from node a's ranks;
* 2 -> 3 (grow): the new rank 2 restores rank 0's rank-local state (the reader's rule);
* 4 -> 3 with a byte of rank 0's own snapshot flipped: detected, its replica on node b used,
  with a warning on every rank; and with node b's memory gone too: no intact copy of rank 0,
  so every rank falls back to the disk (step 5), warned alike.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.test_memory_restore import _flip, _Holder, _model, _to_slot

ROWS = 12  # rows of the sharded tensor: a whole number per rank for 2, 3 and 4 ranks
OLD_NODES = {4: ("a", "a", "b", "b"), 2: ("a", "b")}
NEW_NODES = ("a", "a", "b")


def _state(rank: int, world: int, step: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from recoverkit import ShardedTensor
    from recoverkit.state.sharded import replicated

    model = DDP(_model(float(step)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 64)).sum().backward()
    opt.step()  # momentum buffers: optimizer state, replicated too
    per = ROWS // world
    rows = torch.arange(rank * per, (rank + 1) * per, dtype=torch.float32)[:, None]
    return {
        "model": model,
        "opt": opt,
        "w": ShardedTensor(rows * 10 + torch.arange(8.0) + step * 1000, (ROWS, 8), (rank * per, 0)),
        "shared": replicated({"b": torch.full((3000,), float(step))}),
        "mine": {"x": torch.full((300,), float(1000 * rank + step)), "n": step},
    }


def _fresh(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from recoverkit import ShardedTensor
    from recoverkit.state.sharded import replicated

    model = DDP(_model(-1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per = ROWS // world
    return {
        "model": model,
        "opt": opt,
        "w": ShardedTensor(torch.zeros(per, 8), (ROWS, 8), (rank * per, 0)),
        "shared": replicated({"b": torch.zeros(3000)}),
        "mine": {"x": torch.zeros(300), "n": -1},
    }


def _tensors(state: dict) -> dict:
    out = {f"m/{k}": v for k, v in state["model"].state_dict().items()}
    for i, s in state["opt"].state_dict()["state"].items():
        out[f"o/{i}"] = s["momentum_buffer"]
    shared = getattr(state["shared"], "obj", state["shared"])  # a plain dict is replaced
    out.update({"w": state["w"].local, "shared": shared["b"], "mine": state["mine"]["x"]})
    return out


def _save(rank: int, world: int, tmp: str) -> None:
    """Step 5 on the root's disk, step 7 in shared memory (own slot + a replica on the other
    node) and on the scratch root (the reference)."""
    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierSpec
    from recoverkit.storage.shm import ShmStore

    nodes = OLD_NODES[world]
    root, scratch, shm_dir = (os.path.join(tmp, n) for n in ("ckpt", "scratch", "shm"))
    opts = CheckpointOptions(capture_rng=False, tiers=[TierSpec.local(every_steps=1)])
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save(5, _state(rank, world, 5))
    with Checkpointer(scratch, options=opts) as ckpt:
        ckpt.save(7, _state(rank, world, 7))
    _to_slot(scratch, 7, rank, ShmStore(root, shm_dir=shm_dir, node=nodes[rank]), replica=False)
    other = next(r for r in range(world) if nodes[r] != nodes[rank] and (r - rank) % world == world // 2)
    _to_slot(scratch, 7, rank, ShmStore(root, shm_dir=shm_dir, node=nodes[other]), replica=True)
    dist.barrier()


def _restore(rank: int, world: int, tmp: str) -> dict:
    """Restore from memory (else the disk), and step 7 from the scratch disk into the same
    new sharding; compare."""
    import warnings

    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.reading import CheckpointReader
    from recoverkit.recovery import MemoryRestore, TierFallback
    from recoverkit.storage.local import LocalTier
    from recoverkit.storage.shm import ShmStore

    root, scratch, shm_dir = (os.path.join(tmp, n) for n in ("ckpt", "scratch", "shm"))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("recoverkit").addHandler(handler)
    logging.getLogger("recoverkit").setLevel(logging.INFO)
    holder = _Holder(ShmStore(root, shm_dir=shm_dir, node=NEW_NODES[rank]), default_coordinator(timeout_s=60), 60.0)
    reader = CheckpointReader(root, tiers=[LocalTier(root)], rank=rank, strategies=[MemoryRestore(holder), TierFallback()])
    target = _fresh(rank, world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = int(reader.restore(target, strict=False))
    reference = _fresh(rank, world)
    disk = CheckpointReader(scratch if step == 7 else root, tiers=[LocalTier(scratch if step == 7 else root)], rank=rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader's "rank 0's local state" note, given above too
        disk.restore(reference, strict=False)
    got, want = _tensors(target), _tensors(reference)
    # what this rank gathers of the sharded tensor: only the saved pieces overlapping its rows
    from recoverkit.recovery.memory_plan import needed_regions

    m = LocalTier(scratch).manifest(7)
    per = ROWS // world
    regions = needed_regions(m, rank, wants={"w": ((rank * per, 0), (per, 8))})
    pieces = sorted(s.offsets[0] for s in m.tensors["w"].shards
                    if (s.offset, s.nbytes) in regions.get(s.rank, {}))  # fmt: skip
    return {
        "pieces": pieces,
        "step": step,
        "diff": sorted(k for k in want if not torch.equal(got[k], want[k])),
        "mine": float(target["mine"]["x"][0]),
        "n": target["mine"]["n"],
        "source": " | ".join(m for m in messages if "restores step" in m or "restored step" in m),
        "warnings": [str(w.message) for w in caught],
    }


@pytest.fixture(scope="module")
def saved4(tmp_path_factory):
    """A 4-rank job's memory and disk, copied for each test (saving again takes longer)."""
    src = tmp_path_factory.mktemp("saved4")
    run_world(4, _save, str(src), timeout_s=240)
    return src


def _copy(src, tmp_path) -> str:
    """``src`` under ``tmp_path``, its shared-memory job dirs renamed for the new root (a job
    dir is named after its root's path)."""
    from recoverkit.storage.shm import job_key

    dst = tmp_path / "w"
    shutil.copytree(src, dst, symlinks=True)
    old, new = job_key(os.path.join(str(src), "ckpt")), job_key(os.path.join(str(dst), "ckpt"))
    for node in os.listdir(dst / "shm" / "recoverkit"):
        os.rename(dst / "shm" / "recoverkit" / node / old, dst / "shm" / "recoverkit" / node / new)
    return str(dst)


def _store(tmp: str, node: str):
    from recoverkit.storage.shm import ShmStore

    return ShmStore(os.path.join(tmp, "ckpt"), shm_dir=os.path.join(tmp, "shm"), node=node)


def test_shrink_4_to_3_restores_from_memory_resharded_bit_exact(saved4, tmp_path):
    tmp = _copy(saved4, tmp_path)
    shutil.rmtree(os.path.join(tmp, "shm", "recoverkit", "b"))  # node b's memory lost
    out = run_world(3, _restore, tmp, timeout_s=240)
    for r, o in enumerate(out):
        assert o["step"] == 7 and o["diff"] == [], (r, o)
        assert "saved by 4 rank(s) into a world of 3" in o["source"], o["source"]
        assert o["mine"] == 1000 * r + 7 and o["n"] == 7, o
    assert "rank 3's snapshot from node a via rank" in out[2]["source"], out[2]["source"]
    # rows 0-3, 4-7, 8-11 of pieces 0-2, 3-5, 6-8, 9-11: each new rank reads two of the four
    assert [o["pieces"] for o in out] == [[0, 3], [3, 6], [6, 9]]


def test_grow_2_to_3_restores_from_memory_the_new_rank_gets_rank_0s_local_state(tmp_path):
    run_world(2, _save, str(tmp_path), timeout_s=240)
    out = run_world(3, _restore, str(tmp_path), timeout_s=240)
    for r, o in enumerate(out):
        assert o["step"] == 7 and o["diff"] == [], (r, o)
        assert "saved by 2 rank(s) into a world of 3" in o["source"], o["source"]
    assert [o["mine"] for o in out] == [7.0, 1007.0, 7.0]  # the new rank 2: rank 0's
    assert [o["pieces"] for o in out] == [[0], [0, 6], [6]]  # rows 0-3, 4-7, 8-11 of 0-5, 6-11
    assert any("rank 0's local state" in w for w in out[2]["warnings"]), out[2]["warnings"]


def test_a_corrupted_copy_falls_back_to_its_replica_then_to_disk(saved4, tmp_path):
    tmp = _copy(saved4, tmp_path / "replica")
    _flip(_store(tmp, "a"), 0, 7, replica=False)
    out = run_world(3, _restore, tmp, timeout_s=240)
    for o in out:  # every rank alike: the damaged copy named, the replica on node b used
        assert o["step"] == 7 and o["diff"] == [], o
        assert any("rank 0's snapshot from own shm on node a" in w and "crc" in w for w in o["warnings"]), o
    tmp = _copy(saved4, tmp_path / "disk")
    shutil.rmtree(os.path.join(tmp, "shm", "recoverkit", "b"))
    _flip(_store(tmp, "a"), 0, 7, replica=False)
    out = run_world(3, _restore, tmp, timeout_s=240)
    for o in out:  # no intact copy of rank 0's step 7: the disk's step 5, warned alike
        assert o["step"] == 5 and o["diff"] == [], o
        assert any("rank 0's snapshot from own shm on node a" in w for w in o["warnings"]), o
        assert any("step 7" in w and "[0]" in w for w in o["warnings"]), o["warnings"]
