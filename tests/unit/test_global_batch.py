"""The global batch sampler: every sample once per epoch at any world size (also when the
world changes mid-epoch), the same global batches whatever the world size, resume at another
world size, a DataLoader per rank, and hostile states refused."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from recoverkit.errors import IncompatibleCheckpointError
from recoverkit.state.global_batch import (
    GlobalBatchLoader,
    GlobalBatchSampler,
    split_micro_batches,
)
from recoverkit.state.keyed_rng import keyed_seed


def _epoch_seen(sampler, worlds):
    """Run one epoch; ``worlds[k]`` is the world size at step k. Returns samples per rank-step."""
    seen = []
    epoch = sampler.epoch
    while sampler.epoch == epoch:
        k = sampler.step
        world = worlds[k]
        for rank in range(world):
            for mb in sampler.assign(k, rank, world):
                seen.extend(mb.samples)
        sampler.advance()
    return seen


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7, 13])
def test_every_sample_once_per_epoch_at_any_world_size(world):
    s = GlobalBatchSampler(120, global_batch=24, micro_batch=4, seed=9)
    for epoch in range(2):
        seen = _epoch_seen(s, [world] * s.steps_per_epoch)
        assert sorted(seen) == list(range(120)), (world, epoch)
    assert (s.epoch, s.step) == (2, 0)


def test_world_change_mid_epoch_sees_every_sample_once():
    s = GlobalBatchSampler(120, global_batch=24, micro_batch=4, seed=1)
    seen = _epoch_seen(s, [4, 4, 3, 3, 2])  # 4 ranks for 2 steps, then 3, then 2
    assert Counter(seen) == Counter(range(120))
    seen = _epoch_seen(s, [3, 4, 4, 2, 3])  # and grow back
    assert Counter(seen) == Counter(range(120))


def test_global_batches_do_not_depend_on_the_world_size():
    s = GlobalBatchSampler(100, global_batch=20, micro_batch=5, seed=4)
    for step in range(s.steps_per_epoch):
        mbs = s.micro_batches(step)
        assert [mb.index for mb in mbs] == [0, 1, 2, 3]
        assert [i for mb in mbs for i in mb.samples] == s.global_batch_samples(step)
        for world in (1, 2, 3, 4, 6):
            parts = [s.assign(step, r, world) for r in range(world)]
            assert [mb for part in parts for mb in part] == mbs  # same micro-batches, rank order
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_order_is_a_function_of_seed_and_epoch_only():
    a = GlobalBatchSampler(50, global_batch=10, micro_batch=2, seed=7)
    b = GlobalBatchSampler(50, global_batch=10, micro_batch=5, seed=7)
    assert a.order(3) == b.order(3)
    assert a.order(3) != a.order(4)
    assert GlobalBatchSampler(50, 10, 2, seed=8).order(3) != a.order(3)
    g = torch.Generator().manual_seed(keyed_seed(7, "recoverkit.global_batch.order", 3))
    assert a.order(3) == torch.randperm(50, generator=g).tolist()
    assert GlobalBatchSampler(5, 5, 1, shuffle=False).order(2) == [0, 1, 2, 3, 4]


def test_split_rule():
    assert [list(split_micro_batches(6, r, 4)) for r in range(4)] == [[0, 1], [2, 3], [4], [5]]
    assert [list(split_micro_batches(2, r, 4)) for r in range(4)] == [[0], [1], [], []]
    for bad in [(1, 0, 0), (1, 2, 2), (1, -1, 2), (-1, 0, 1)]:
        with pytest.raises(ValueError):
            split_micro_batches(*bad)


def test_partial_last_batch_without_drop_last():
    with pytest.raises(ValueError, match="multiple"):
        GlobalBatchSampler(50, global_batch=20, micro_batch=8)
    s = GlobalBatchSampler(50, global_batch=20, micro_batch=4, drop_last=False, seed=2)
    assert s.steps_per_epoch == 3 and [s.batch_size(k) for k in range(3)] == [20, 20, 10]
    assert [len(mb) for mb in s.micro_batches(2)] == [4, 4, 2]
    assert sorted(_epoch_seen(s, [3, 3, 3])) == list(range(50))
    dropped = GlobalBatchSampler(50, global_batch=20, micro_batch=4, seed=2)
    assert dropped.steps_per_epoch == 2
    with pytest.raises(IndexError):
        dropped.batch_size(2)


def test_resume_from_state_dict_at_another_world_size():
    ref = GlobalBatchSampler(96, global_batch=16, micro_batch=4, seed=5)
    full = _epoch_seen(ref, [4] * 6) + _epoch_seen(ref, [4] * 6)
    s = GlobalBatchSampler(96, global_batch=16, micro_batch=4, seed=5)
    before = _epoch_seen_steps(s, 4, world=4)
    saved = s.state_dict()
    assert saved == {
        "epoch": 0, "step": 4, "seed": 5, "shuffle": True, "num_samples": 96,
        "global_batch": 16, "micro_batch": 4, "drop_last": True,
    }  # fmt: skip
    resumed = GlobalBatchSampler(96, global_batch=16, micro_batch=4, seed=0)  # seed comes from the state
    resumed.load_state_dict(saved)
    after = _epoch_seen(resumed, [None] * 4 + [3, 3]) + _epoch_seen(resumed, [2] * 6)
    assert before + after == full  # the same samples in the same order, at 3 then 2 ranks
    # a finished epoch is saved as the start of the next one
    s.advance(2)
    assert (s.state_dict()["epoch"], s.state_dict()["step"]) == (1, 0)
    end = {**saved, "step": 6}
    resumed.load_state_dict(end)
    assert (resumed.epoch, resumed.step) == (1, 0)


def _epoch_seen_steps(sampler, steps, world):
    seen = []
    for _ in range(steps):
        for rank in range(world):
            for mb in sampler.assign(sampler.step, rank, world):
                seen.extend(mb.samples)
        sampler.advance()
    return seen


def test_rank_batches_feed_a_dataloader_and_carry_the_state():
    ds = TensorDataset(torch.arange(60))
    s = GlobalBatchSampler(60, global_batch=12, micro_batch=3, seed=6)
    s.advance(2)
    got = []
    for rank in range(3):
        batches = s.rank_batches(rank, 3)
        plan = batches.plan()
        loaded = [b.tolist() for (b,) in DataLoader(ds, batch_sampler=batches)]
        assert loaded == [list(mb.samples) for mb in plan]
        assert len(batches) == len(plan) == sum(len(s.assign(k, rank, 3)) for k in range(2, 5))
        got.extend(i for b in loaded for i in b)
    assert sorted(got) == sorted(i for k in range(2, 5) for i in s.global_batch_samples(k))
    assert (s.epoch, s.step) == (0, 2)  # iterating (and prefetching) does not move the position
    s.rank_batches(0, 3).set_epoch(1)
    assert (s.epoch, s.step) == (1, 0)
    with pytest.raises(ValueError):
        s.rank_batches(3, 3)


def _ranks(world, state=None, **kw):
    """One (sampler, loader) per rank, as each process of a world holds its own."""
    ds = TensorDataset(torch.arange(60))
    out = []
    for rank in range(world):
        s = GlobalBatchSampler(60, global_batch=12, micro_batch=3, seed=6)
        if state is not None:
            s.load_state_dict(state)
        out.append(GlobalBatchLoader(ds, s, rank, world, **kw))
    return out


def _take(loaders, steps):
    seen = []
    its = [iter(loader) for loader in loaders]
    for _ in range(steps):
        for it in its:
            sb = next(it)
            for mb, (x,) in sb:
                assert x.tolist() == list(mb.samples) and mb.key == (sb.epoch, sb.step, mb.index)
                seen.extend(mb.samples)
            assert sb.batch_size == 12
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batch_loader_resumes_at_another_world_size(workers):
    kw = {"num_workers": workers} if workers else {}
    four = _ranks(4, **kw)
    seen = _take(four, 2)  # prefetching workers do not move the position past what was handed out
    states = [loader.state_dict() for loader in four]
    assert all(st == states[0] for st in states) and states[0]["step"] == 2
    three = _ranks(3, states[0], **kw)
    assert [len(loader) for loader in three] == [3, 3, 3]
    seen += _take(three, 3)
    assert sorted(seen) == list(range(60))  # every sample of the epoch once, across 4 -> 3
    assert three[0].state_dict()["epoch"] == 1 and three[0].state_dict()["step"] == 0
    # set_world: the same loader continues at another world size from the next iteration
    one = three[0]
    one.set_world(0, 1)
    assert sorted(_take([one], 5)) == list(range(60))
    with pytest.raises(ValueError, match="decides"):
        GlobalBatchLoader(TensorDataset(torch.arange(60)), one.sampler, 0, 1, batch_size=4)


def test_global_batch_loader_refuses_a_sampler_moved_under_it():
    (loader,) = _ranks(1)
    it = iter(loader)
    next(it)
    loader.sampler.advance()
    with pytest.raises(RuntimeError, match="do not call advance"):
        next(it)


def test_protect_saves_and_resumes_the_global_position(tmp_path, monkeypatch):
    import recoverkit

    monkeypatch.setenv("RECOVERKIT_SHM_DIR", str(tmp_path / "shm"))
    root = str(tmp_path / "ckpt")
    ds = TensorDataset(torch.arange(60))

    def run(world, max_steps):
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = GlobalBatchSampler(60, global_batch=12, micro_batch=3, seed=6)
        loader = GlobalBatchLoader(ds, s, 0, world)
        steps = []
        with recoverkit.protect(
            root, model=model, optimizer=opt, loader=loader, save_every=1, epochs=None,
            max_steps=max_steps,
        ) as r:  # fmt: skip
            for sb in r:
                steps.append((sb.epoch, sb.step, [mb.index for mb, _ in sb]))
        return steps, r.resumed_from

    first, resumed = run(world=1, max_steps=3)
    assert first == [(0, k, [0, 1, 2, 3]) for k in range(3)] and resumed is None
    rest, resumed = run(world=2, max_steps=7)  # the same global steps on, as rank 0 of 2
    assert resumed == 3
    assert rest == [(0, 3, [0, 1]), (0, 4, [0, 1]), (1, 0, [0, 1]), (1, 1, [0, 1])]


def _valid():
    return GlobalBatchSampler(96, global_batch=16, micro_batch=4, seed=5).state_dict()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: [1, 2], "must be a dict"),
        (lambda d: {k: v for k, v in d.items() if k != "step"}, "missing \\['step'\\]"),
        (lambda d: {**d, "world_size": 4}, "unexpected \\['world_size'\\]"),
        (lambda d: {**{k: v for k, v in d.items() if k != "epoch"}, 0: 0}, "keys"),
        (lambda d: {**d, "step": 1.0}, "'step' must be int"),
        (lambda d: {**d, "step": True}, "'step' must be int"),
        (lambda d: {**d, "epoch": "0"}, "'epoch' must be int"),
        (lambda d: {**d, "shuffle": 1}, "'shuffle' must be bool"),
        (lambda d: {**d, "step": -1}, "step -1 is outside 0..6"),
        (lambda d: {**d, "step": 7}, "step 7 is outside"),
        (lambda d: {**d, "epoch": -1}, "epoch -1 is out of range"),
        (lambda d: {**d, "epoch": 2**200}, "out of range"),
        (lambda d: {**d, "seed": 2**127}, "seed"),
        (lambda d: {**d, "num_samples": 10**18}, "batch sizes changed"),
        (lambda d: {**d, "global_batch": 32}, "batch sizes changed"),
        (lambda d: {**d, "micro_batch": 8}, "batch sizes changed"),
        (lambda d: {**d, "drop_last": False}, "batch sizes changed"),
    ],
)
def test_crafted_states_are_refused_and_change_nothing(change, match):
    s = GlobalBatchSampler(96, global_batch=16, micro_batch=4, seed=1)
    s.advance(3)
    before = s.state_dict()
    with pytest.raises(IncompatibleCheckpointError, match=match):
        s.load_state_dict(change(_valid()))
    assert s.state_dict() == before


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_samples=-1, global_batch=4, micro_batch=2),
        dict(num_samples=8, global_batch=0, micro_batch=1),
        dict(num_samples=8, global_batch=4, micro_batch=0),
        dict(num_samples=8.0, global_batch=4, micro_batch=2),
        dict(num_samples=8, global_batch=4, micro_batch=2, seed=2**127),
    ],
)
def test_bad_construction_is_refused(kwargs):
    with pytest.raises(ValueError, match="GlobalBatchSampler"):
        GlobalBatchSampler(**kwargs)


def test_micro_batch_keys_name_the_logical_micro_batch():
    s = GlobalBatchSampler(40, global_batch=8, micro_batch=2, seed=0)
    s.set_epoch(2)
    mbs = s.assign(3, 1, 2)
    assert [mb.key for mb in mbs] == [(2, 3, 2), (2, 3, 3)]


def test_advance_moves_forward_only():
    s = GlobalBatchSampler(40, global_batch=8, micro_batch=2)
    s.advance(7)
    assert (s.epoch, s.step) == (1, 2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="advance"):
            s.advance(bad)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
