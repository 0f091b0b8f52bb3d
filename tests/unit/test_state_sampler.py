"""ResumableSampler, DataPosition, and the replay of a user's own sampler: a resumed run sees exactly the samples it would have."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from recoverkit.integrations.pytorch import LoaderPosition
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from recoverkit.errors import IncompatibleCheckpointError
from recoverkit.state import (
    DataPosition,
    ResumableSampler,
    apply,
    capture,
    decode,
    encode,
    unflatten,
)
from recoverkit.state.flatten import flatten
from recoverkit.state.sampler import EpochStreams, ReplaySampler


def _through_codec(captured):
    return decode(encode(captured))  # sampler and position states hold no tensors


def _epochs(sampler, n):
    return [list(sampler) for _ in range(n)]


def test_each_epoch_is_a_seeded_permutation():
    s = ResumableSampler(20, seed=5)
    e0, e1 = _epochs(s, 2)
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1
    assert s.epoch == 1
    again = ResumableSampler(range(20), seed=5)
    assert _epochs(again, 2) == [e0, e1]
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    assert e0 == torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30), seed=st.integers(0, 2**31), stop=st.integers(0, 90), shuffle=st.booleans()
)
def test_resume_anywhere_equals_the_uninterrupted_run(n, seed, stop, shuffle):
    full = [
        i for epoch in _epochs(ResumableSampler(n, seed=seed, shuffle=shuffle), 3) for i in epoch
    ]
    stop = min(stop, len(full))
    s = ResumableSampler(n, seed=seed, shuffle=shuffle)
    seen = []
    while len(seen) < stop:  # stop after `stop` samples, possibly at an epoch boundary
        for i in s:
            seen.append(i)
            if len(seen) == stop:
                break
    saved = _through_codec(capture({"data": s}))
    fresh = ResumableSampler(n, seed=0, shuffle=True)  # the saved seed and shuffle win
    apply({"data": fresh}, saved)
    rest = []
    while len(seen) + len(rest) < len(full):
        rest += list(fresh)
    assert seen + rest == full


def test_set_epoch_keeps_the_position_of_the_current_epoch():
    s = ResumableSampler(10, seed=1)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    s.set_epoch(0)  # same epoch: a resumed loop calls this; the position stays
    assert s.index == 4
    assert head + list(s) == ResumableSampler(10, seed=1).order(0)
    s.set_epoch(3)
    assert (s.epoch, s.index) == (3, 0) and list(s) == ResumableSampler(10, seed=1).order(3)
    assert next(it, None) is None  # the older iterator stopped when the position moved


def _set_epoch_loop(sampler, start, seen, limit=None):
    for epoch in range(start, 3):
        sampler.set_epoch(epoch)
        for i in sampler:
            seen.append(i)
            if len(seen) == limit:
                return


@pytest.mark.parametrize("stop", [1, 7, 10, 11, 20, 29])
def test_set_epoch_loop_resumes_at_any_point(stop):
    full: list[int] = []
    _set_epoch_loop(ResumableSampler(10, seed=3), 0, full)
    head: list[int] = []
    s = ResumableSampler(10, seed=3)
    _set_epoch_loop(s, 0, head, limit=stop)
    saved = _through_codec(s.state_dict())
    assert (saved["epoch"], saved["index"]) == divmod(
        stop, 10
    )  # a finished epoch saves as the next
    resumed = ResumableSampler(10)
    resumed.load_state_dict(saved)
    tail: list[int] = []
    _set_epoch_loop(resumed, resumed.epoch, tail)
    assert head + tail == full


def test_set_epoch_names_the_epoch_to_iterate():
    s = ResumableSampler(4, seed=0)
    list(s)
    s.set_epoch(0)
    assert list(s) == []  # epoch 0 is finished; set_epoch(0) does not move on
    assert list(s) == ResumableSampler(4, seed=0).order(1)  # without it, the next epoch starts
    assert s.epoch == 1


def test_bad_states_are_refused():
    s = ResumableSampler(10)
    for bad in (
        {"epoch": 0, "index": 11, "seed": 0, "shuffle": True, "length": 10},
        {"epoch": 0, "index": "3", "seed": 0, "shuffle": True, "length": 10},
        {"epoch": 0, "seed": 0, "shuffle": True, "length": 10},
        {"epoch": 0, "index": 0, "seed": 0, "shuffle": True, "length": 12},
    ):
        with pytest.raises(IncompatibleCheckpointError):
            s.load_state_dict(bad)
    assert (s.epoch, s.index) == (0, 0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_replicas_split_each_epoch(drop_last):
    n, world = 10, 3
    ranks = [
        ResumableSampler(n, seed=2, num_replicas=world, rank=r, drop_last=drop_last)
        for r in range(world)
    ]
    parts = [list(s) for s in ranks]
    assert all(len(p) == (3 if drop_last else 4) == len(s) for p, s in zip(parts, ranks))
    union = [i for p in parts for i in p]
    assert set(union) <= set(range(n)) and len(set(union)) == (9 if drop_last else 10)


class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


_N, _BATCH, _EPOCHS = 50, 4, 3


def _run(*, stop_after=None, saved=None, drop_last=False):
    """A training loop over a 2-worker DataLoader; stops after `stop_after` batches and saves."""
    sampler = ResumableSampler(_N, seed=7)
    position = DataPosition(sampler)
    loader = DataLoader(
        _Indices(_N),
        batch_size=_BATCH,
        sampler=sampler,
        num_workers=2,
        prefetch_factor=2,
        drop_last=drop_last,
    )
    if saved is not None:
        apply({"data": position}, saved)
    seen, batches = [], 0
    for epoch in range(position.epoch, _EPOCHS):
        sampler.set_epoch(epoch)
        for batch in loader:
            seen += batch.tolist()
            position.advance(len(batch))
            batches += 1
            if batches == stop_after:
                ahead = sampler.index - position.index
                return seen, _through_codec(capture({"data": position})), ahead
    return seen, None, 0


@pytest.mark.parametrize(
    ("stop_after", "drop_last"), [(5, False), (13, False), (20, False), (14, True)]
)
def test_dataloader_with_workers_resumes_exactly(stop_after, drop_last):
    full, _, _ = _run(drop_last=drop_last)
    assert len(full) == _EPOCHS * (48 if drop_last else 50)
    head, saved, ahead = _run(stop_after=stop_after, drop_last=drop_last)
    if stop_after in (5, 20):
        assert ahead > 0  # the workers' prefetch ran the sampler ahead of the loop
    tail, _, _ = _run(saved=saved, drop_last=drop_last)
    assert head + tail == full


def test_the_sampler_alone_would_skip_prefetched_samples():
    """Why DataPosition exists: restoring the sampler's own position loses samples."""
    sampler = ResumableSampler(_N, seed=7)
    loader = DataLoader(
        _Indices(_N), batch_size=_BATCH, sampler=sampler, num_workers=2, prefetch_factor=2
    )
    it = iter(loader)
    head = [i for _ in range(3) for i in next(it).tolist()]
    naive = sampler.state_dict()
    del it
    resumed = ResumableSampler(_N)
    resumed.load_state_dict(naive)
    assert head + list(resumed) != ResumableSampler(_N, seed=7).order(0)


def test_position_without_a_sampler_counts():
    p = DataPosition()
    p.advance(8)
    p.set_epoch(0)
    assert p.state_dict() == {"epoch": 0, "index": 8}
    p.set_epoch(1)
    p.advance(2)
    q = DataPosition()
    apply({"p": q}, _through_codec(capture({"p": p})))
    assert (q.epoch, q.index) == (1, 2)
    with pytest.raises(IncompatibleCheckpointError):
        q.load_state_dict({"epoch": 1})


def test_rewind_returns_prefetched_samples():
    sampler = ResumableSampler(12, seed=4)
    position = DataPosition(sampler)
    it = iter(sampler)
    drawn = [next(it) for _ in range(6)]  # drawn by a prefetching loader ...
    position.advance(2)  # ... but only two consumed
    position.rewind()
    assert drawn[:2] + list(sampler) == ResumableSampler(12, seed=4).order(0)


# ------------------------------------------------------- a user's own sampler, replayed exactly


def _through_save(tree):
    """Tensors out and back (copied), the rest through the codec, as a checkpoint does."""
    skeleton, refs = flatten(tree)
    return unflatten(decode(encode(skeleton)), {r.key: r.tensor.clone() for r in refs})




def _replayed_epochs(replay, position, epochs, *, stop=None):
    """Drive a ReplaySampler the way protect() does; stop after `stop` items."""
    seen = []
    while position.epoch < epochs:
        resume = position.index > 0
        replay.begin(position.epoch, skip=position.index, replay=position.start if resume else None)
        replay.prime()
        position.start = replay.start
        for item in replay:
            seen.append(item)
            position.advance()
            if len(seen) == stop:
                return seen
        position.next_epoch()
    return seen


def _make(g):
    inner = BatchSampler(RandomSampler(range(23), generator=g), 4, drop_last=False)
    streams = EpochStreams([g])
    replay = ReplaySampler(inner, streams, eager=True)
    position = LoaderPosition(streams, mode="replay", epoch_length=lambda e: replay.length, size=lambda: len(replay))
    return replay, position


@pytest.mark.parametrize("stop", [1, 5, 6, 7, 13])
def test_replay_resumes_anywhere_through_the_codec(stop):
    user = BatchSampler(RandomSampler(range(23), generator=torch.Generator().manual_seed(4)), 4, False)
    expected = [b for _ in range(3) for b in user]  # what the user's sampler alone yields
    head = _replayed_epochs(*_make(torch.Generator().manual_seed(4)), 3, stop=stop)
    replay, position = _make(torch.Generator().manual_seed(4))
    _replayed_epochs(replay, position, 3, stop=stop)
    saved = _through_save(capture({"data": position}))
    if stop % 6 == 0:  # an epoch (6 batches) just ended: saved as the start of the next one
        assert (saved["data"]["epoch"], saved["data"]["index"], saved["data"]["start"]) == (stop // 6, 0, None)
    fresh_g = torch.Generator().manual_seed(999)  # the generator's saved state wins
    replay2, position2 = _make(fresh_g)
    apply({"data": position2}, saved)
    assert head + _replayed_epochs(replay2, position2, 3) == expected


def test_loader_position_refuses_what_it_cannot_load():
    g = torch.Generator().manual_seed(0)
    _, position = _make(g)
    good = position.state_dict()
    start = EpochStreams([g]).capture()
    bad_gen = {**start, "generators": [torch.zeros(7, dtype=torch.uint8)]}
    for bad, match in (
        ({"epoch": 0, "index": 3, "seed": 0, "shuffle": True, "length": 10}, "replaced the loader's sampler"),
        ({**good, "mode": "count"}, "'count' mode"),
        ({**good, "index": 2}, "has no 'start'"),
        ({**good, "index": 7, "start": start}, "7 batches into epoch 0, but the loader has 6"),
        ({**good, "index": -1}, "out of range"),
        ({**good, "now": {"generators": [], "sampler": None}}, "0 generator state"),
        ({**good, "index": 2, "start": bad_gen}, "generator 0 cannot be loaded"),
        ({**good, "index": 2, "start": {**start, "torch": torch.zeros(3)}}, "uint8"),
        ({**good, "now": {"generators": good["now"]["generators"], "sampler": {"x": 1}}}, "keeps none"),
    ):
        with pytest.raises(IncompatibleCheckpointError, match=match):
            position.load_state_dict(bad)
    assert (position.epoch, position.index, position.start) == (0, 0, None)


def test_replay_of_a_changed_sampler_is_refused():
    replay = ReplaySampler(list(range(5)), EpochStreams(), eager=True)
    replay.begin(0, skip=6)
    with pytest.raises(IncompatibleCheckpointError, match="consumed 6 batches of epoch 0, but list yields 5"):
        replay.prime()
    lazy = ReplaySampler(range(5), EpochStreams(), eager=False)
    lazy.begin(0, skip=9)
    with pytest.raises(IncompatibleCheckpointError, match="yields 5"):
        list(lazy)


def test_epoch_streams_set_back_global_and_generator_draws():
    g = torch.Generator().manual_seed(1)
    streams = EpochStreams([g])
    snap = _through_save(streams.capture())
    first = (torch.rand(3).tolist(), torch.rand(2, generator=g).tolist(), float(np.random.rand()), random.random())
    streams.set(snap)
    assert first == (torch.rand(3).tolist(), torch.rand(2, generator=g).tolist(), float(np.random.rand()), random.random())
