"""Restore from memory across ranks (recovery/memory.py) in real gloo worlds on simulated nodes.

4 ranks on 2 nodes ("a": ranks 0-1, "b": ranks 2-3), a data-parallel state (DDP model and
its optimizer: replicated tensors, each written by one owner rank) plus rank-local state.
Step 7 exists only in shared memory: each rank's own snapshot in its node's slots and,
where a test asks for it, a replica on the other node; the disk holds step 5. The snapshots
are real slots of the real ShmStore holding the bytes and records of a real save (the
segment file of each rank, its records named as the shm index names them); the restore is
the real one, through a CheckpointReader whose strategies are MemoryRestore then
TierFallback. Node loss = the node's shm job dir deleted; corruption = one byte flipped in
a slot's data.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from tests.distributed.harness import run_world

NODES = ("a", "a", "b", "b")


def _node_of(rank: int) -> str:
    return NODES[rank]


def _model(seed: float) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * 0.001 * (i + 1) + seed)
    return m


def _state(rank: int, step: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model(float(step)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 64)).sum().backward()
    opt.step()  # momentum buffers: optimizer state, replicated too
    return {
        "model": model,
        "opt": opt,
        "mine": {"x": torch.full((300,), float(1000 * rank + step)), "n": step},
    }


def _fresh(rank: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model(-1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"model": model, "opt": opt, "mine": {"x": torch.zeros(300), "n": -1}}


def _same(a, b) -> bool:
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    if any(not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    oa, ob = a["opt"].state_dict()["state"], b["opt"].state_dict()["state"]
    if oa.keys() != ob.keys() or any(not torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"]) for k in oa):
        return False
    return torch.equal(a["mine"]["x"], b["mine"]["x"]) and a["mine"]["n"] == b["mine"]["n"]


def _to_slot(scratch: str, step: int, owner: int, store, *, replica: bool) -> None:
    """Write owner ``owner``'s part of committed ``step`` under ``scratch`` into a slot of
    ``store``: its segment file's bytes, its records renamed to the shm data file (a packed
    shard gets its own CRC: slots hold no packs)."""
    from recoverkit.format.checksum import crc32c
    from recoverkit.format.manifest import BlobRecord, ShardRecord
    from recoverkit.format.shm_index import data_file, make_index
    from recoverkit.storage.layout import step_dirname
    from recoverkit.storage.local import LocalTier

    m = LocalTier(scratch).manifest(step)
    blob = m.blob_for(owner)
    with open(os.path.join(scratch, step_dirname(step), blob.file), "rb") as f:
        data = f.read()
    name = data_file(owner)
    shards, tensors = [], {}
    for key, rec in m.tensors.items():
        for s in rec.shards:
            if s.rank == owner:
                crc = crc32c(data[s.offset : s.offset + s.nbytes])
                shards.append([key, ShardRecord(owner, name, s.offset, s.nbytes, crc, s.offsets, s.shape).to_json()])
                tensors[key] = [rec.dtype, list(rec.shape)]
    aliases = {k: r for k, r in m.tensors.items() if r.alias_of is not None} if owner == 0 else {}
    records = {
        "rank": owner,
        "blob": BlobRecord(owner, name, blob.offset, blob.nbytes, blob.crc32c).to_json(),
        "shards": shards,
        "files": {name: len(data)},
    }
    # as the save says it: the rank restores from this snapshot alone unless it needs a
    # tensor another rank wrote (a replicated one of another owner)
    alone = all(
        any(s.rank == owner for s in rec.shards)
        for key, rec in m.tensors.items()
        if rec.alias_of is None and not key.startswith("rank-")
    )
    w = store.slots(owner, replica=replica).begin(step, len(data))
    w.view[:] = data
    w.commit(make_index(step=step, run_id=m.run_id, world_size=m.world_size, rank=owner, records=records,
                        shards_meta=tensors, aliases=aliases, data_bytes=len(data), self_contained=alone))


def _flip(store, owner: int, step: int, *, replica: bool) -> None:
    """Flip one byte of a replicated tensor (one every rank reads) in ``owner``'s slot holding
    ``step`` (its index stays valid)."""
    slots = store.slots(owner, replica=replica)
    with slots.open(step) as v:
        shard = max((s for k, s in v.index.shards if not k.startswith("rank-")), key=lambda s: s.nbytes)
        path, offset = v.path, shard.offset + shard.nbytes // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _vanishing_store():
    from recoverkit.errors import CheckpointNotFoundError
    from recoverkit.storage.shm import ShmStore

    class VanishingStore(ShmStore):
        """A store (injected, rank 2's) whose own slot of rank 2 opens once: the scan sees it,
        then it is gone, as when its node's memory is lost in the middle of a restore."""

        opened = 0

        def slots(self, owner, replica=False):
            got = super().slots(owner, replica)
            if owner != 2 or replica:
                return got
            store, real = self, got.open

            def open_once(step):
                store.opened += 1
                if store.opened > 1:
                    raise CheckpointNotFoundError(f"{got.dir}: gone")
                return real(step)

            got.open = open_once
            return got

    return VanishingStore


def _VanishingStore(*args, **kwargs):  # noqa: N802 - a class, built where torch is imported
    return _vanishing_store()(*args, **kwargs)


class _Holder:
    """What MemoryRestore uses of the shm tier: its store, coordinator, rank, world, timeout."""

    def __init__(self, store, coordinator, timeout_s: float) -> None:
        self.store, self.coordinator, self.timeout_s = store, coordinator, timeout_s
        self.rank, self.world_size = coordinator.rank, coordinator.world_size


def _world(rank: int, world: int, tmp: str, scenario: str) -> dict:
    import warnings

    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierSpec
    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.reading import CheckpointReader
    from recoverkit.recovery import TierFallback
    from recoverkit.recovery.memory import MemoryRestore
    from recoverkit.storage.local import LocalTier
    from recoverkit.storage.shm import ShmStore

    root, scratch = os.path.join(tmp, "ckpt"), os.path.join(tmp, "scratch")
    shm_dir = os.path.join(tmp, "shm")
    opts = CheckpointOptions(capture_rng=False, tiers=[TierSpec.local(every_steps=1)])
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save(5, _state(rank, 5))  # the disk: step 5
    with Checkpointer(scratch, options=opts) as ckpt:
        ckpt.save(7, _state(rank, 7))  # the bytes of step 7, for the slots
    store = ShmStore(root, shm_dir=shm_dir, node=_node_of(rank))
    _to_slot(scratch, 7, rank, store, replica=False)
    if scenario != "no replicas":  # ring by node: rank r holds a replica of rank (r + 2) % 4
        _to_slot(scratch, 7, (rank + 2) % world, store, replica=True)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(scratch)
        if scenario in ("node b lost", "replica of 2 corrupt", "both copies of 2 gone"):
            shutil.rmtree(os.path.join(shm_dir, "recoverkit", "b"))
        if scenario == "replica of 2 corrupt":
            _flip(store, 2, 7, replica=True)
        if scenario == "both copies of 2 gone":
            store.slots(2, replica=True).invalidate(7)
    if scenario == "own copy of 2 corrupt" and rank == 2:
        _flip(store, 2, 7, replica=False)
    dist.barrier()

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("recoverkit").addHandler(handler)
    logging.getLogger("recoverkit").setLevel(logging.INFO)
    store_cls = _VanishingStore if scenario == "own copy of 2 vanishes" and rank == 2 else ShmStore
    holder = _Holder(store_cls(root, shm_dir=shm_dir, node=_node_of(rank)), default_coordinator(timeout_s=60), 60.0)
    reader = CheckpointReader(
        root, tiers=[LocalTier(root)], rank=rank, restore_rng=False,
        strategies=[MemoryRestore(holder), TierFallback()],
    )
    target = _fresh(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = int(reader.restore(target))
    expected = _state(rank, step)
    used = [r for r in records if "from memory" in r]
    return {
        "step": step,
        "exact": _same(target, expected),
        "source": used[0] if used else None,
        "warnings": [str(w.message) for w in caught],
    }


def _run(tmp_path, scenario: str) -> list[dict]:
    return run_world(4, _world, str(tmp_path), scenario, timeout_s=240)


def test_every_rank_alive_restores_from_its_own_nodes_memory(tmp_path):
    out = _run(tmp_path, "all alive")
    assert [o["step"] for o in out] == [7, 7, 7, 7]
    assert all(o["exact"] for o in out)
    for r, o in enumerate(out):  # replicated tensors owned by others: from this node's copies
        assert o["source"] and f"rank {r}'s snapshot from own shm on node {NODES[r]}" in o["source"]
        assert "via rank" not in o["source"]


def test_without_replicas_replicated_tensors_come_from_their_owners_node(tmp_path):
    out = _run(tmp_path, "no replicas")
    assert [o["step"] for o in out] == [7, 7, 7, 7]
    assert all(o["exact"] for o in out)
    assert "rank 0's snapshot from node a via rank" in out[2]["source"]
    assert "rank 2's snapshot from node b via rank" in out[0]["source"]


def test_a_lost_node_is_restored_from_the_replicas_on_the_other(tmp_path):
    out = _run(tmp_path, "node b lost")
    assert [o["step"] for o in out] == [7, 7, 7, 7]
    assert all(o["exact"] for o in out)
    assert "rank 2's snapshot from node a via rank" in out[2]["source"]
    assert "rank 2's snapshot from replica on node a" in out[0]["source"]


def test_a_corrupted_own_copy_is_detected_and_the_replica_used(tmp_path):
    out = _run(tmp_path, "own copy of 2 corrupt")
    assert [o["step"] for o in out] == [7, 7, 7, 7]
    assert all(o["exact"] for o in out)
    assert "rank 2's snapshot from node a via rank" in out[2]["source"]
    assert any("rank 2's snapshot from own shm on node b" in w for w in out[2]["warnings"])


def test_a_copy_that_vanishes_mid_restore_is_replaced_by_the_next_holder(tmp_path):
    out = _run(tmp_path, "own copy of 2 vanishes")
    assert [o["step"] for o in out] == [7, 7, 7, 7]
    assert all(o["exact"] for o in out)
    assert "rank 2's snapshot from node a via rank" in out[2]["source"]
    assert any("no longer holds rank 2's snapshot" in w for w in out[2]["warnings"]), out[2]["warnings"]


def test_a_corrupted_last_copy_falls_back_to_disk_on_every_rank(tmp_path):
    out = _run(tmp_path, "replica of 2 corrupt")
    assert [o["step"] for o in out] == [5, 5, 5, 5]
    assert all(o["exact"] for o in out)
    assert all(o["source"] is None for o in out)
    assert any("replica on node a" in w and "crc" in w for w in out[0]["warnings"]), out[0]["warnings"]


def test_both_copies_of_a_rank_gone_falls_back_to_disk_naming_what_was_skipped(tmp_path):
    out = _run(tmp_path, "both copies of 2 gone")
    assert [o["step"] for o in out] == [5, 5, 5, 5]
    assert all(o["exact"] for o in out)
    for o in out:
        assert any("step 7" in w and "[2]" in w for w in o["warnings"]), o["warnings"]


def _late_rank(rank: int, world: int, tmp: str) -> dict:
    """Rank 1 never joins the restore: rank 0's memory restore gives up after its timeout
    and reads the disk, with a warning."""
    import warnings

    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierSpec
    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.reading import CheckpointReader
    from recoverkit.recovery import MemoryRestore, TierFallback
    from recoverkit.storage.local import LocalTier
    from recoverkit.storage.shm import ShmStore

    root, scratch, shm_dir = (os.path.join(tmp, n) for n in ("ckpt", "scratch", "shm"))
    opts = CheckpointOptions(capture_rng=False, tiers=[TierSpec.local(every_steps=1)])
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save(5, _state(rank, 5))
    with Checkpointer(scratch, options=opts) as ckpt:
        ckpt.save(7, _state(rank, 7))
    _to_slot(scratch, 7, rank, ShmStore(root, shm_dir=shm_dir, node="a"), replica=False)
    coordinator = default_coordinator(timeout_s=60)
    target, expected = _fresh(rank), _state(rank, 5)  # DDP models are built together
    dist.barrier()
    out: dict = {}
    if rank == 0:
        holder = _Holder(ShmStore(root, shm_dir=shm_dir, node="a"), coordinator, 3.0)
        reader = CheckpointReader(root, tiers=[LocalTier(root)], rank=rank, restore_rng=False,
                                  strategies=[MemoryRestore(holder), TierFallback()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["step"] = int(reader.restore(target))
        out["exact"] = _same(target, expected)
        out["warnings"] = [str(w.message) for w in caught]
    dist.barrier()
    return out


def test_a_rank_that_does_not_answer_makes_the_others_read_the_disk(tmp_path):
    out = run_world(2, _late_rank, str(tmp_path), timeout_s=120)
    assert out[0]["step"] == 5 and out[0]["exact"]
    assert any("not every rank answered" in w for w in out[0]["warnings"]), out[0]["warnings"]


def _fails_to_apply(rank: int, world: int, tmp: str) -> dict:
    """Rank 1's ``use`` finds the memory source damaged after the verdict (as when a writer
    overwrote a slot meanwhile): every rank falls back to the disk together."""
    import warnings

    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierSpec
    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.errors import IntegrityError
    from recoverkit.recovery import Loss, MemoryRestore, RecoveryChain, Survivors, TierFallback
    from recoverkit.storage.local import LocalTier
    from recoverkit.storage.shm import ShmStore

    root, scratch, shm_dir = (os.path.join(tmp, n) for n in ("ckpt", "scratch", "shm"))
    opts = CheckpointOptions(capture_rng=False, tiers=[TierSpec.local(every_steps=1)])
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save(5, _state(rank, 5))
    with Checkpointer(scratch, options=opts) as ckpt:
        ckpt.save(7, _state(rank, 7))
    _to_slot(scratch, 7, rank, ShmStore(root, shm_dir=shm_dir, node="a"), replica=False)
    holder = _Holder(ShmStore(root, shm_dir=shm_dir, node="a"), default_coordinator(timeout_s=60), 60.0)
    dist.barrier()
    used = []

    def use(source):
        used.append((source.step, source.tier_name))
        if rank == 1 and source.tier_name == "memory":
            raise IntegrityError("overwritten meanwhile")
        return source.step

    chain = RecoveryChain([MemoryRestore(holder), TierFallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = chain.run(Loss(), Survivors(tiers=[LocalTier(root)]), use)
    return {"step": got.value, "strategy": got.strategy, "used": used, "warnings": [str(w.message) for w in caught]}


def test_a_rank_that_cannot_apply_the_memory_step_makes_every_rank_read_the_disk(tmp_path):
    out = run_world(2, _fails_to_apply, str(tmp_path), timeout_s=120)
    for o in out:
        assert o["step"] == 5 and o["strategy"] == "tier fallback", o
        assert o["used"][0] == (7, "memory")  # both had it from memory; the disk overwrote it
        assert any("rank 1: IntegrityError: overwritten meanwhile" in w for w in o["warnings"]), o["warnings"]


ROWS = 16  # rows of the sharded tensor: 4 per rank


def _sharded_state(rank: int, step: int) -> dict:
    from recoverkit import ShardedTensor
    from recoverkit.state.sharded import replicated

    per = ROWS // 4
    rows = torch.arange(rank * per, (rank + 1) * per, dtype=torch.float32)[:, None]
    return {
        "w": ShardedTensor(rows * 10 + torch.arange(8.0) + step * 1000, (ROWS, 8), (rank * per, 0)),
        "shared": replicated({"b": torch.full((3000,), float(step))}),
        "mine": torch.full((100,), float(100 * rank + step)),
    }


def _sharded_world(rank: int, world: int, tmp: str) -> dict:
    """A sharded tensor (a quarter per rank), a replicated entry and rank-local state; node b
    lost: its ranks fetch the shards, the replicated entry and their own state from node a."""
    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierSpec
    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.reading import CheckpointReader
    from recoverkit.recovery import MemoryRestore, TierFallback
    from recoverkit.storage.local import LocalTier
    from recoverkit.storage.shm import ShmStore

    root, scratch, shm_dir = (os.path.join(tmp, n) for n in ("ckpt", "scratch", "shm"))
    opts = CheckpointOptions(capture_rng=False, tiers=[TierSpec.local(every_steps=1)])
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save(5, _sharded_state(rank, 5))
    with Checkpointer(scratch, options=opts) as ckpt:
        ckpt.save(7, _sharded_state(rank, 7))
    store = ShmStore(root, shm_dir=shm_dir, node=_node_of(rank))
    _to_slot(scratch, 7, rank, store, replica=False)
    _to_slot(scratch, 7, (rank + 2) % world, store, replica=True)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(shm_dir, "recoverkit", "b"))
    dist.barrier()
    holder = _Holder(ShmStore(root, shm_dir=shm_dir, node=_node_of(rank)), default_coordinator(timeout_s=60), 60.0)
    reader = CheckpointReader(root, tiers=[LocalTier(root)], rank=rank, strategies=[MemoryRestore(holder), TierFallback()])
    target = _sharded_state(rank, 0)
    step = int(reader.restore(target, strict=False))
    want = _sharded_state(rank, 7)
    shared = getattr(target["shared"], "obj", target["shared"])  # a plain dict is replaced
    return {
        "step": step,
        "exact": torch.equal(target["w"].local, want["w"].local)
        and torch.equal(shared["b"], want["shared"].obj["b"])
        and torch.equal(target["mine"], want["mine"]),
    }


def test_sharded_and_replicated_state_of_a_lost_node_comes_from_the_other(tmp_path):
    out = run_world(4, _sharded_world, str(tmp_path), timeout_s=240)
    assert [o["step"] for o in out] == [7, 7, 7, 7]
    assert all(o["exact"] for o in out), out
