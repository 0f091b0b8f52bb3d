"""Many small tensors: packed in segment files and in the staging pool, written and read back
bit-exactly by both engines, blocking and lazy; the same tensor under two top-level keys is
stored once and restored as one object."""

from __future__ import annotations

import os

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit._native import engine as real_engine
from recoverkit.config import StagingPolicy
from recoverkit.format.segment import (
    ALIGNMENT,
    PACK_ALIGNMENT,
    PACK_BELOW,
    natural_alignment,
    plan_offsets,
    segment_name,
)
from recoverkit.restore.reader import read_state
from recoverkit.staging.plan import plan_save
from recoverkit.staging.snapshot import BLOCK_BYTES, HostSnapshot
from recoverkit.staging.sync import stage_now
from recoverkit.storage.base import RankPayload
from recoverkit.storage.local import LocalTier
from tests.native.helpers import load_backend

PIECE_BYTES = 64 << 20  # CheckpointOptions' default

N_SMALL = 2000


def _small_state(n: int = N_SMALL) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(4, generator=g) for i in range(n)}


def _segment(root: str, step: int) -> tuple[int, dict]:
    ckpt = Checkpointer(root, options=CheckpointOptions(lock=False))
    try:
        m = ckpt.manifest(step)
    finally:
        ckpt.close()
    return m.files[segment_name(0)], m.tensors


# ----------------------------------------------------------------------------- layout
def test_layout_packs_small_buffers_and_aligns_large_ones():
    sizes = [100, 16, 16, 12, 1, 8, PACK_BELOW, 3, 2, 8, 0, PACK_BELOW - 1, 40]
    offsets, end = plan_offsets(sizes, pack_below=PACK_BELOW)
    spans = sorted((o, o + n) for o, n in zip(offsets, sizes) if n)
    assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:]))  # no overlap
    for o, n in zip(offsets, sizes):
        if n >= PACK_BELOW:
            assert o % ALIGNMENT == 0, (o, n)
        elif n:
            assert o % natural_alignment(n) == 0, (o, n)
    assert offsets[:6] == [0, 112, 128, 144, 156, 160]  # back to back, each at its alignment
    assert end == max(o + n for o, n in zip(offsets, sizes))
    # the padding between buffers stays under 64 bytes for small ones
    packed = [(o, n) for o, n in zip(offsets, sizes) if 0 < n < PACK_BELOW]
    assert end - sum(sizes) < ALIGNMENT + PACK_ALIGNMENT * len(packed)
    # the default still aligns everything (writers opt in to packing)
    assert plan_offsets([1, 16])[0] == [0, ALIGNMENT]


def test_natural_alignment_is_at_least_every_dtypes_itemsize():
    for dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.float64, torch.complex128):
        item = torch.empty(0, dtype=dtype).element_size()
        for numel in (1, 3, 5, 7, 100):
            a = natural_alignment(numel * item)
            assert a % item == 0 and a <= PACK_ALIGNMENT


@pytest.mark.parametrize("direct", [True, False])
def test_packed_layout_written_identically_by_both_engines(tmp_path, direct):
    native, python = load_backend("native"), load_backend("python")
    g = torch.Generator().manual_seed(1)
    bufs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in
            (333, 16, 16, 4, 12, 7, PACK_BELOW + 5, 8, 24, 0, 3 * ALIGNMENT + 1, 2, 64)]
    offsets, end = plan_offsets([b.numel() for b in bufs], pack_below=PACK_BELOW)
    items = [(o, b.data_ptr(), b.numel()) for o, b in zip(offsets, bufs)]
    files = []
    for eng in (native, python):
        path = str(tmp_path / f"{eng.BACKEND}.seg")
        crcs = eng.write_segment(path, items, direct=direct, fsync=False, crc=True)
        assert list(crcs) == [eng.crc32c(b.numpy().tobytes()) if b.numel() else 0 for b in bufs]
        with open(path, "rb") as f:
            files.append(f.read())
    expected = bytearray(end)
    for o, b in zip(offsets, bufs):
        expected[o:o + b.numel()] = b.numpy().tobytes()
    assert files[0] == files[1] == bytes(expected)


# ------------------------------------------------------------------------ blocking save
def test_many_small_tensors_take_their_bytes_on_disk(tmp_path):
    state = _small_state()
    root = str(tmp_path / "ck")
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"s": state})
        size, tensors = _segment(root, 1)
        m = ckpt.manifest(1)
        assert size - m.nbytes < PACK_ALIGNMENT * len(m.tensors)  # padding only; was ~4 KiB per tensor
        offs = [tensors[f"s/t{i}"].shards[0].offset for i in range(N_SMALL)]
        assert len(set(offs)) == N_SMALL and any(o % ALIGNMENT for o in offs)
        assert all(o % 16 == 0 for o in offs)  # 16-byte tensors at their natural alignment
        target = {"s": {k: torch.zeros(4) for k in state}}
        assert ckpt.restore(target) == 1
    assert all(torch.equal(target["s"][k], v) for k, v in state.items())


def test_mixed_sizes_and_dtypes_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    state = {
        "odd": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
        "f64": torch.randn(5, dtype=torch.float64, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c128": torch.randn(3, dtype=torch.complex128, generator=g),
        "big": torch.randn(PACK_BELOW // 4 + 3, generator=g),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5),
        "i8": torch.randint(-5, 5, (9,), dtype=torch.int8, generator=g),
    }
    root = str(tmp_path / "ck")
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"s": state})
        tensors = ckpt.manifest(1).tensors
        for k, t in state.items():
            shard = tensors[f"s/{k}"].shards[0]
            if t.numel() * t.element_size() >= PACK_BELOW:
                assert shard.offset % ALIGNMENT == 0
            elif shard.nbytes:
                assert shard.offset % t.element_size() == 0
        target = {"s": {k: torch.empty_like(v) for k, v in state.items()}}
        ckpt.restore(target)
    for k, v in state.items():
        assert torch.equal(target["s"][k], v), k


def test_write_rank_writes_each_shard_at_its_recorded_offset(tmp_path):
    state = _small_state(50) | {"big": torch.arange(PACK_BELOW, dtype=torch.uint8)}
    plan = plan_save({"s": state}, capture_rng=False, piece_bytes=PIECE_BYTES)
    tier = LocalTier(str(tmp_path), direct_io=True)
    staging = tier.prepare(1)
    records = tier.write_rank(staging, RankPayload(0, plan.blob, [stage_now(p) for p in plan.shards]))
    with open(os.path.join(tier._here(staging), segment_name(0)), "rb") as f:
        raw = f.read()
    assert len(raw) == records.files[segment_name(0)]
    for (key, rec), p in zip(records.shards, plan.shards):
        assert key == p.key
        assert raw[rec.offset:rec.offset + rec.nbytes] == p.source.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        region = rec.pack or rec  # a packed shard is checked by its pack's CRC
        assert rec.crc32c == real_engine.crc32c(raw[region.offset:region.offset + region.nbytes])
    packs = {rec.pack for _, rec in records.shards if rec.pack is not None}
    assert len(packs) == 1 and sum(rec.pack is not None for _, rec in records.shards) == 50
    assert next(iter(packs)).nbytes == 50 * 16  # 50 tensors of 4 float32, back to back


# --------------------------------------------------------------------------- lazy save
def test_small_shards_share_pool_ranges():
    state = {f"t{i}": torch.randn(4) for i in range(5000)} | {"big": torch.randn(PACK_BELOW)}
    plan = plan_save({"s": state}, capture_rng=False, piece_bytes=PIECE_BYTES)
    need = HostSnapshot.footprint(plan, 4096)
    data = sum(p.nbytes for p in plan.shards)
    assert need <= data + 2 * 4096  # one shared range for the small ones, one for the big one
    pool = real_engine.StagingPool(need)
    engine = real_engine.CopyEngine(1)
    try:
        snap = HostSnapshot(1, plan, pool, engine)
        snap.allocate(plan)
        assert pool.used == need
        snap.start_copies(set(), 1 << 20)
        payload = snap.payload(0)
        for p, s in zip(plan.shards, payload.shards):
            assert torch.equal(s.data, p.source.reshape(-1).view(torch.uint8)), p.key
            assert s.crc32c == real_engine.crc32c(s.data.numpy().tobytes())
        snap.release()
        assert pool.used == 0
    finally:
        engine.close()
        pool.close()


def test_packed_ranges_are_bounded():
    n = BLOCK_BYTES // (PACK_BELOW // 2) * 3  # three ranges' worth of half-limit tensors
    plan = plan_save({"s": [torch.zeros(PACK_BELOW // 8) for _ in range(n)]}, capture_rng=False, piece_bytes=PIECE_BYTES)
    pool = real_engine.StagingPool(HostSnapshot.footprint(plan, 4096))
    engine = real_engine.CopyEngine(1)
    try:
        snap = HostSnapshot(1, plan, pool, engine)
        snap.allocate(plan)
        assert 3 <= len(snap._ranges) <= 4
        assert max(snap._sizes) <= BLOCK_BYTES
        snap.release()
    finally:
        engine.close()
        pool.close()


def test_lazy_small_shards_among_eager_ones_keep_their_bytes(tmp_path):
    # eager_bytes=0: the optimizer's small tensors are copied lazily by the engine, right
    # next to eagerly copied buffers in the same packed range; the step after the save
    # changes the parameters, the checkpoint must hold the values from before it.
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(20)])
    for i, m in enumerate(model):
        m.register_buffer("count", torch.full((5,), float(i)))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(2, 3)).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = CheckpointOptions(staging=StagingPolicy(eager_bytes=0, budget_bytes=1 << 20))
    root = str(tmp_path / "ck")
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save_async(1, {"model": model, "optim": opt})
        opt.step()  # waits for the lazy copies first
        assert ckpt.wait(timeout_s=60)
        fresh = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(20)])
        for m in fresh:
            m.register_buffer("count", torch.zeros(5))
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5)
        assert ckpt.restore({"model": fresh, "optim": fresh_opt}) == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_async_many_small_tensors_host_and_disk(tmp_path):
    state = _small_state()
    root = str(tmp_path / "ck")
    with Checkpointer(root) as ckpt:
        h = ckpt.save_async(1, {"s": state})
        assert ckpt.wait(timeout_s=120) and h.committed.is_set()
        target = {"s": {k: torch.zeros(4) for k in state}}
        assert ckpt.restore(target) == 1  # from the host snapshot
        assert all(torch.equal(target["s"][k], v) for k, v in state.items())
    size, _ = _segment(root, 1)
    with Checkpointer(root) as ckpt:  # a new process's view: from disk
        target = {"s": {k: torch.zeros(4) for k in state}}
        assert ckpt.restore(target) == 1
        m = ckpt.manifest(1)
        assert size - m.nbytes < PACK_ALIGNMENT * len(m.tensors)
    assert all(torch.equal(target["s"][k], v) for k, v in state.items())


# ------------------------------------------------------------ one tensor, two top keys
def test_same_tensor_under_two_top_level_keys_is_stored_once(tmp_path):
    t = torch.randn(6)
    root = str(tmp_path / "ck")
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"a": t, "b": t, "c": t.clone()})
        tensors = ckpt.manifest(1).tensors
        assert tensors["b"].alias_of == "a" and not tensors["b"].shards
        assert tensors["c"].alias_of is None  # equal values, different memory: stored
        assert tensors["a"].shards
        state = {"a": None, "b": None, "c": None}
        assert ckpt.restore(state) == 1
    assert state["a"] is state["b"] and state["c"] is not state["a"]
    assert torch.equal(state["a"], t) and torch.equal(state["c"], t)


def test_module_and_entry_sharing_a_tensor(tmp_path):
    model = torch.nn.Linear(4, 2)
    root = str(tmp_path / "ck")
    with Checkpointer(root) as ckpt:
        h = ckpt.save_async(1, {"model": model, "w": model.weight, "bias": [model.bias]})
        assert ckpt.wait(timeout_s=60) and h.committed.is_set()
        tensors = ckpt.manifest(1).tensors
        assert tensors["w"].alias_of == "model/weight"
        assert tensors["bias/0"].alias_of == "model/bias"
        stored = [k for k, r in tensors.items() if r.alias_of is None and not k.startswith("__rng__")]
        assert sorted(stored) == ["model/bias", "model/weight"]
        captured = read_state(ckpt.tier, 1, ckpt.manifest(1))
        # one tensor: the same memory (``w`` comes back as the Parameter it was)
        assert captured["w"].data_ptr() == captured["model"]["weight"].data_ptr()
        assert captured["bias"][0].data_ptr() == captured["model"]["bias"].data_ptr()
        fresh = torch.nn.Linear(4, 2)
        state = {"model": fresh, "w": None, "bias": None}
        ckpt.restore(state)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert torch.equal(state["w"], model.weight) and torch.equal(state["bias"][0], model.bias)
