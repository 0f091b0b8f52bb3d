"""Saves staged straight into a shared-memory slot (``staging.slot_arena``): the same records
and bytes as the copy path, the slot lent never handed out while in use, the pool path
when no slot is free, and the slot's snapshot readable after the arena is released.

Real engine, real slots in a per-test shared-memory directory, real Checkpointers.
"""

from __future__ import annotations

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit._native import resolve
from recoverkit.config import StagingPolicy, TierSpec
from recoverkit.errors import PoolExhaustedError
from recoverkit.format.checksum import crc32c
from recoverkit.staging.guard import StepGuard
from recoverkit.staging.metrics import SaveMetrics
from recoverkit.staging.plan import plan_save
from recoverkit.staging.shm_tier import ShmTier
from recoverkit.staging.slot_arena import SlotArena
from recoverkit.staging.stager import Stager
from recoverkit.storage.faults import FaultInjector
from recoverkit.storage.shm import ShmStore, SlotBusyError
from tests.models import Trainer, params_equal


@pytest.fixture
def shm(tmp_path):
    path = str(tmp_path / "shm")
    yield path
    for job in ShmStore.jobs(path):
        ShmStore.remove(job)


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(300_000, generator=g),  # a range of its own (lazy when watched)
        "w": torch.randn(64, 33, generator=g, dtype=torch.float64),  # packed with the small ones
        "b": torch.arange(7, dtype=torch.int16),
        "empty": torch.zeros(0),
        "meta": {"lr": 0.5, "name": "run"},
    }


def _stage(stager: Stager, step: int, state: dict, keep_in=None):
    plan = plan_save(state, capture_rng=False, piece_bytes=1 << 30)
    snap = stager.stage(step, plan, [], SaveMetrics(), lambda: False, keep_in=keep_in)
    assert snap is not None
    snap.wait_all()
    return snap


def _records(tier: ShmTier, step: int) -> dict:
    idx = tier.index(step)
    return {k: (s.nbytes, s.crc32c, tuple(s.offsets), tuple(s.shape)) for k, s in idx.shards}


def _bytes(tier: ShmTier, step: int) -> dict:
    idx = tier.index(step)
    with tier.slots.open(step) as v:
        out = {k: bytes(v.memory_view(s.offset, s.nbytes)) for k, s in idx.shards}
        out["<blob>"] = bytes(v.memory_view(idx.blob.offset, idx.blob.nbytes))
    return out


@pytest.fixture
def parts(tmp_path, shm):
    engine = resolve(None)
    store = ShmStore(str(tmp_path / "root"), shm_dir=shm, node="n0", budget_bytes=64 << 20, slots=2)
    tier = ShmTier(store, run_id="r", engine=engine, faults=FaultInjector())
    stager = Stager(engine=engine, policy=StagingPolicy(budget_bytes=16 << 20), guard=StepGuard())
    # a slot is lent only once mapped with room (what a copied save does): map both, torn
    writers = [tier.slots.begin(0, 4 << 20) for _ in range(2)]
    for w in writers:
        w.abort()
    yield tier, stager
    tier.discard()
    stager.close()


def test_a_save_staged_into_a_slot_has_the_copy_paths_records_and_bytes(parts):
    tier, stager = parts
    state = _state()
    copied = _stage(stager, 1, state)  # no lender attached yet: the pool, then copied
    assert copied.arena is None and copied.metrics["staged_in"] == "pool"
    tier.offer(copied)
    copied.release()
    in_place = _stage(stager, 2, state, keep_in=[tier])
    assert in_place.arena is not None and in_place.metrics["staged_in"] == "shm"
    assert stager.into_slot == 1 and stager.into_pool == 1
    tier.offer(in_place)
    assert (tier.copied, tier.in_place, tier.written) == (1, 1, 2)
    assert tier.steps() == [1, 2]  # listed while the arena is still in use
    assert _records(tier, 1) == _records(tier, 2)
    a, b = tier.index(1), tier.index(2)
    assert a.blob.crc32c == b.blob.crc32c and a.blob.nbytes == b.blob.nbytes
    assert a.meta == b.meta and a.self_contained == b.self_contained
    assert _bytes(tier, 1) == _bytes(tier, 2)
    for key, s in b.shards:  # every record's CRC is the bytes' in the slot
        assert crc32c(_bytes(tier, 2)[key]) == s.crc32c
    # the staged payload reads the slot itself: what the disk tiers write is what shm holds
    payload = in_place.payload(0)
    assert {s.key: bytes(s.data.numpy()) for s in payload.shards} == {k: v for k, v in _bytes(tier, 2).items() if k != "<blob>"}
    in_place.release()
    assert in_place.arena.released and tier.steps() == [1, 2]  # released: still readable
    assert _bytes(tier, 2) == _bytes(tier, 1)


def test_the_slot_lent_is_never_handed_out_while_in_use(parts, tmp_path, shm):
    tier, stager = parts
    state = _state()
    first = _stage(stager, 1, state, keep_in=[tier])
    tier.offer(first)  # committed, newest, and still held as first's arena
    second = _stage(stager, 2, state, keep_in=[tier])  # the other slot
    assert second.arena is not None and second.arena.writer.slot != first.arena.writer.slot
    other = ShmStore(str(tmp_path / "root"), shm_dir=shm, node="n0", budget_bytes=64 << 20, slots=2)
    for slots in (tier.slots, other.slots(0)):  # neither the held nor the newest: none free
        with pytest.raises(SlotBusyError):
            slots.begin(3, 4096)
    third = _stage(stager, 3, state, keep_in=[tier])  # so the pool path
    assert third.arena is None and third.metrics["staged_in"] == "pool" and tier.arena_misses == 1
    tier.offer(second)  # step 2 newest; step 1's slot still held by its snapshot
    with pytest.raises(SlotBusyError):
        tier.slots.begin(3, 4096)
    first.release()  # now step 1's slot may be taken
    w = tier.slots.begin(3, 4096)
    assert w.slot == first.arena.writer.slot
    w.abort()
    for s in (second, third):
        s.release()
    other.close()


def test_no_free_slot_falls_back_to_the_pool_and_the_copy_path(parts):
    tier, stager = parts
    state = _state()
    for step in (1, 2):
        s = _stage(stager, step, state)
        tier.offer(s)
        s.release()
    with tier.slots.open(1) as v1, tier.slots.open(2):  # both pinned: nothing to lend
        snap = _stage(stager, 3, state)  # attached by the offers, expected (every step)
        assert snap.arena is None and snap.metrics["staged_in"] == "pool" and tier.arena_misses == 1
        assert bytes(v1.data[:8])  # the pinned snapshot untouched
    tier.offer(snap)  # unpinned by now: copied from the pool into a slot
    assert (tier.copied, tier.in_place) == (2, 1) and tier.steps() == [2, 3]  # 1 copied, 2 in place
    snap.release()
    nxt = _stage(stager, 4, state)
    assert nxt.arena is not None  # a slot is free again: the fast path
    tier.offer(nxt)
    nxt.release()
    assert tier.in_place == 2 and tier.steps() == [3, 4] and _records(tier, 3) == _records(tier, 4)


def test_a_slot_not_mapped_with_room_is_not_lent(parts):
    tier, stager = parts
    big = {"big": torch.zeros(2 << 20)}  # 8 MiB: more than either slot maps
    first = _stage(stager, 1, big, keep_in=[tier])
    assert first.arena is None and tier.arena_misses == 1  # no growth on the training thread
    tier.offer(first)  # the copy path grows and maps a slot (the drain's thread)
    first.release()
    second = _stage(stager, 2, big, keep_in=[tier])
    assert second.arena is None  # the other slot is still too small; the grown one is the newest
    tier.offer(second)
    second.release()
    third = _stage(stager, 3, big, keep_in=[tier])
    assert third.arena is not None
    tier.offer(third)
    third.release()
    assert tier.steps() == [2, 3] and _records(tier, 2) == _records(tier, 3)


def test_an_arena_not_committed_leaves_its_slot_torn_and_free(parts):
    tier, stager = parts
    first = _stage(stager, 1, _state(), keep_in=[tier])
    tier.offer(first)
    first.release()
    lost = _stage(stager, 2, _state(1), keep_in=[tier])  # never offered (e.g. superseded)
    lost.release()
    assert tier.steps() == [1]  # the torn slot never listed; the newest untouched
    again = _stage(stager, 3, _state(), keep_in=[tier])
    assert again.arena.writer.slot == lost.arena.writer.slot
    tier.offer(again)
    again.release()
    assert tier.steps() == [1, 3] and _records(tier, 1) == _records(tier, 3)


def test_slot_arena_allocates_within_the_slot_and_ends_once(tmp_path, shm):
    store = ShmStore(str(tmp_path / "root"), shm_dir=shm, node="n0", budget_bytes=1 << 20, slots=2)
    w = store.slots(0).begin(4, 3 * 4096, hold=True)
    arena = SlotArena(w, alignment=4096, base=100)
    assert arena.alloc(10) == 4096 and arena.alloc(0) == 8192 and arena.alloc(4096) == 8192
    with pytest.raises(PoolExhaustedError):
        arena.alloc(1)
    arena.view(4096, 10)[:] = b"0123456789"
    with pytest.raises(ValueError):
        arena.view(3 * 4096 - 5, 10)
    arena.release()
    arena.release()  # once
    with pytest.raises(ValueError):
        arena.address(0)
    assert store.slots(0).steps() == []  # never committed: torn
    w2 = store.slots(0).begin(5, 4096)  # and free
    w2.abort()
    store.remove_job()


def test_checkpointer_stages_every_step_into_shm_and_restores_bit_exact(root, shm):
    opts = CheckpointOptions(
        tiers=[TierSpec.shm(shm_dir=shm), TierSpec.local(every_steps=3)], staging=StagingPolicy(budget_bytes=32 << 20)
    )
    t = Trainer()
    ckpt = Checkpointer(root, options=opts)
    handles = []
    for _ in range(7):
        t.train_step()
        handles.append(ckpt.save_async(t.step, t.state()))
        ckpt.wait()
    tier = ckpt.tiers["shm"]
    # the first two saves create and map the two slots (copied); from the 3rd on, staged in place
    assert [h.metrics["staged_in"] for h in handles] == ["pool"] * 2 + ["shm"] * 5
    assert tier.in_place == 5 and tier.written == 7 and tier.steps() == [6, 7]
    assert ckpt.tiers["local"].steps()[-1] == 6  # the disk wrote from the slot's ranges
    ckpt.close(keep_snapshots=True)
    again = Trainer(seed=1)
    with Checkpointer(root, options=opts) as second:
        state = again.state()
        assert second.restore(state) == 7
        assert params_equal(again.model, t.model)
