"""protect() keeps the user's sampling exactly, and resumes it exactly.

For every kind of sampler, the sample indices a protect() run consumes equal what the
user's loader alone yields (epoch by epoch, ``set_epoch`` called as a hand-written loop
would); a run SIGKILLed mid-epoch and started again consumes exactly the indices it had
not consumed. Each loop draws from the global RNG between batches (as dropout would), so
the interplay of the training's and the sampler's random numbers is checked too.

The module is also the subprocess worker:
``python -m tests.integrations.test_protect_samplers KIND MODE ROOT [DIE_AT [SAVE_EVERY]]``
prints one JSON line per consumed batch (MODE ``plain``: the user's loader alone).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    get_worker_info,
)
from torch.utils.data.distributed import DistributedSampler

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 42  # samples; batch 4 -> 11 batches per epoch (the last one short)
EPOCHS = 3


class Indices(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        return i


class Stream(IterableDataset):
    """A stream with no len(): each epoch a different order, drawn from the global RNG when
    the stream starts, split between workers."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = (torch.randperm(N) + 1000 * self.epoch).tolist()
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        return iter(order)


class Reversed(Sampler[int]):
    """A sampler recoverkit does not know, with no hidden state."""

    def __len__(self) -> int:
        return N

    def __iter__(self):
        return iter(range(N - 1, -1, -1))


class Rotating(Sampler[int]):
    """Hidden state: each iteration starts one further on. Saved when it has a state_dict."""

    def __init__(self) -> None:
        self.turns = 0

    def __len__(self) -> int:
        return N

    def __iter__(self):
        self.turns += 1
        return iter([(i + 5 * self.turns) % N for i in range(N)])


class RotatingStateful(Rotating):
    def state_dict(self):
        return {"turns": self.turns}

    def load_state_dict(self, sd) -> None:
        self.turns = sd["turns"]


def make_loader(kind: str) -> DataLoader:
    """The user's loader for ``kind`` (global RNG seeded by the caller)."""
    ds = Indices()
    g = torch.Generator().manual_seed(11)
    weights = torch.linspace(0.1, 3.0, N)
    if kind == "shuffle":
        return DataLoader(ds, batch_size=4, shuffle=True)
    if kind == "shuffle-workers":
        return DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    if kind == "shuffle-persistent":
        return DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    if kind == "shuffle-generator":
        return DataLoader(ds, batch_size=4, shuffle=True, generator=g, num_workers=2)
    if kind == "sequential":
        return DataLoader(ds, batch_size=4, sampler=SequentialSampler(ds))
    if kind == "replacement":
        return DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True, num_samples=70, generator=g))
    if kind == "num-samples":
        return DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, num_samples=50))
    if kind == "subset":
        return DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(list(range(0, N, 3)), generator=g))
    if kind == "weighted":
        return DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler(weights, 45, replacement=True))
    if kind == "weighted-no-replacement":
        return DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler(weights, 30, replacement=False, generator=g))
    if kind == "distributed":
        return DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=3, rank=1, shuffle=True, seed=5))
    if kind == "distributed-drop-last":
        return DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=4, rank=3, seed=9, drop_last=True))
    if kind == "batch-sampler":
        return DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 5, drop_last=True), num_workers=2)
    if kind == "batch-sampler-distributed":
        sampler = DistributedSampler(ds, num_replicas=2, rank=0, seed=3)
        return DataLoader(ds, batch_sampler=BatchSampler(sampler, 3, drop_last=False))
    if kind == "no-batching":
        return DataLoader(ds, batch_size=None, sampler=RandomSampler(ds))
    if kind == "iterable":
        return DataLoader(Stream(), batch_size=4)
    if kind == "iterable-workers":
        return DataLoader(Stream(), batch_size=4, num_workers=2)
    if kind == "custom":
        return DataLoader(ds, batch_size=4, sampler=Reversed())
    if kind == "stateful":
        return DataLoader(ds, batch_size=4, sampler=RotatingStateful())
    raise ValueError(kind)


KINDS = [
    "shuffle", "shuffle-workers", "shuffle-persistent", "shuffle-generator", "sequential", "replacement",
    "num-samples", "subset", "weighted", "weighted-no-replacement", "distributed", "distributed-drop-last",
    "batch-sampler", "batch-sampler-distributed", "no-batching", "iterable", "iterable-workers", "custom",
    "stateful",
]


def _ids(batch) -> list[int]:
    return batch.tolist() if isinstance(batch, torch.Tensor) else [int(batch)]


def _noise() -> float:
    return torch.rand(()).item()  # the training's own draws from the global RNG (dropout)


def plain(kind: str, epochs: int = EPOCHS):
    """What the user's loader alone yields, with set_epoch called as a loop would."""
    torch.manual_seed(0)
    loader = make_loader(kind)
    out = []
    for epoch in range(epochs):
        for s in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None), loader.dataset):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        for batch in loader:
            out.append([_ids(batch), _noise()])
    return out


def protected(kind: str, root: str, *, die_at: int = -1, save_every: int = 3, emit=None):
    import recoverkit

    torch.manual_seed(0)
    loader = make_loader(kind)
    out = []
    with recoverkit.protect(root, loader=loader, save_every=save_every, epochs=EPOCHS) as run:
        if emit:
            emit({"event": "start", "resumed": run.resumed_from})
        for batch in run:
            item = [_ids(batch), _noise()]
            out.append(item)
            if emit:
                emit({"event": "step", "step": run.step + 1, "batch": item})
            if run.step + 1 == die_at:
                run.ckpt.settle()
                os.kill(os.getpid(), signal.SIGKILL)
    return out


# ---------------------------------------------------------------- in-process: same samples


@pytest.mark.parametrize("kind", KINDS)
def test_protect_consumes_what_the_users_loader_yields(tmp_path, kind):
    reference = plain(kind)
    assert reference  # every kind yields batches
    assert protected(kind, str(tmp_path / "run")) == reference


def test_the_samplers_own_semantics_are_kept(tmp_path):
    """The bugs of the issue, stated directly: shard, subset and weights survive protect()."""
    got = {k: [i for ids, _ in protected(k, str(tmp_path / k)) for i in ids] for k in ("distributed", "subset", "weighted")}
    per_epoch = math.ceil(N / 3)
    assert len(got["distributed"]) == EPOCHS * per_epoch  # one rank's shard, not the whole dataset
    assert got["distributed"][:per_epoch] != sorted(got["distributed"][:per_epoch])  # shuffled
    assert set(got["subset"]) == set(range(0, N, 3))  # the subset only
    low, high = sum(i < N // 2 for i in got["weighted"]), sum(i >= N // 2 for i in got["weighted"])
    assert high > 2 * low  # the weights (rising with the index) are obeyed


# ---------------------------------------------------------------- SIGKILL mid-epoch, resume


def _launch(kind, mode, root, *extra):
    cmd = [sys.executable, "-m", "tests.integrations.test_protect_samplers", kind, mode, root, *map(str, extra)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events, proc.stderr


@pytest.mark.parametrize(
    ("kind", "die_at", "save_every"),
    [
        ("shuffle-workers", 16, 3),  # resumes from step 15 or 12: epoch 1, batch 4 or 1
        ("shuffle-persistent", 16, 3),
        ("shuffle-persistent", 13, 11),  # from step 11: the end of epoch 0 (no mid-epoch snapshot)
        ("shuffle-generator", 16, 3),
        ("replacement", 23, 3),
        ("weighted", 16, 3),
        ("subset", 7, 2),
        ("distributed", 9, 2),
        ("batch-sampler", 15, 4),
        ("no-batching", 50, 7),
        ("iterable", 16, 3),
        ("iterable-workers", 16, 3),
        ("stateful", 16, 3),
    ],
)
def test_sigkill_mid_epoch_resumes_exactly(tmp_path, kind, die_at, save_every):
    code, events, err = _launch(kind, "plain", "-")
    assert code == 0, err[-3000:]
    reference = [e["batch"] for e in events]
    root = str(tmp_path / "run")
    code, first, err = _launch(kind, "protect", root, die_at, save_every)
    assert code == -signal.SIGKILL, err[-3000:]
    consumed = [e["batch"] for e in first if e["event"] == "step"]
    assert consumed == reference[:die_at]
    code, second, err = _launch(kind, "protect", root)
    assert code == 0, err[-3000:]
    resumed = second[0]["resumed"]
    assert resumed is not None and die_at - save_every <= resumed < die_at and resumed % save_every == 0
    rest = [e["batch"] for e in second if e["event"] == "step"]
    assert rest == reference[resumed:]  # exactly the rest, bit for bit (indices and RNG draws)


# ---------------------------------------------------------------- DistributedSampler, 2 ranks


def _ddp_loader() -> DataLoader:
    ds = Indices()  # 21 samples a rank: 6 batches an epoch, the last one short
    return DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, shuffle=True, seed=7), num_workers=2)


def _ddp_plain(rank, world):
    torch.manual_seed(rank)
    loader = _ddp_loader()
    out = []
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        out += [[batch.tolist(), _noise()] for batch in loader]
    return out


def _ddp_protected(rank, world, root, die_at, log):
    import torch.distributed as dist

    import recoverkit

    torch.manual_seed(rank)
    out = []
    with recoverkit.protect(root, loader=_ddp_loader(), save_every=3, epochs=EPOCHS) as run:
        resumed = run.resumed_from
        for batch in run:
            item = [batch.tolist(), _noise()]
            out.append(item)
            with open(f"{log}.{rank}", "a") as f:
                f.write(json.dumps(item) + "\n")
            if run.step + 1 == die_at:
                run.ckpt.settle()
                dist.barrier()  # both ranks' saves are settled; then both die
                os.kill(os.getpid(), signal.SIGKILL)
    return {"resumed": resumed, "out": out}


def test_distributed_sampler_two_ranks_sigkill_and_resume(tmp_path):
    from tests.distributed.harness import run_world

    reference = run_world(2, _ddp_plain)
    per_epoch = 6
    for epoch in range(EPOCHS):  # the reference itself: disjoint shards, reshuffled every epoch
        shards = [[i for ids, _ in ref[epoch * per_epoch : (epoch + 1) * per_epoch] for i in ids] for ref in reference]
        assert sorted(shards[0] + shards[1]) == list(range(N)) and len(shards[0]) == len(shards[1]) == N // 2
    assert reference[0][0][0] != reference[0][per_epoch][0]
    root, log = str(tmp_path / "run"), str(tmp_path / "consumed")
    killed = run_world(2, _ddp_protected, root, 10, log)  # SIGKILLed after step 10: epoch 1, batch 4
    assert killed == [None, None]
    rest = run_world(2, _ddp_protected, root, -1, str(tmp_path / "unused"))
    for rank in range(2):
        with open(f"{log}.{rank}") as f:
            head = [json.loads(line) for line in f]
        assert head == reference[rank][:10]
        assert rest[rank]["resumed"] == 9  # epoch 1, after 3 of its 6 batches
        assert rest[rank]["out"] == reference[rank][9:]


# ---------------------------------------------------------------- what cannot be seen into


def test_an_unknown_sampler_is_named_in_a_warning(tmp_path):
    import recoverkit

    loader = DataLoader(Indices(), batch_size=4, sampler=Rotating())
    with pytest.warns(UserWarning, match=r"sampler Rotating\b.*iterates Rotating again.*skips the batches"):
        with recoverkit.protect(str(tmp_path / "a"), loader=loader) as run:
            assert sum(1 for _ in run) == 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own samplers and stateful ones: no warning
        for kind in ("shuffle", "distributed", "batch-sampler", "iterable", "stateful"):
            with recoverkit.protect(str(tmp_path / kind), loader=make_loader(kind), epochs=1) as run:
                assert sum(1 for _ in run) > 0


def test_a_changed_dataset_is_refused_on_resume(tmp_path):
    """The position names more batches than the epoch now has: a clear error, not a silent restart."""
    import recoverkit
    from recoverkit.errors import IncompatibleCheckpointError

    root = str(tmp_path / "run")
    ds = Indices()
    with recoverkit.protect(root, loader=DataLoader(ds, batch_size=4, shuffle=True), save_every=9, max_steps=9) as run:
        assert sum(1 for _ in run) == 9
    short = torch.utils.data.Subset(ds, range(20))  # 5 batches an epoch now
    with pytest.raises(IncompatibleCheckpointError, match=r"9 batches into epoch 0, but the loader has 5 batches"):
        with recoverkit.protect(root, loader=DataLoader(short, batch_size=4, shuffle=True), save_every=9):
            pass  # refused on entry, before anything was restored
    lazy = DataLoader(ds, batch_size=4, sampler=FirstTwenty())  # unknown: checked as it is drawn
    with pytest.raises(IncompatibleCheckpointError, match=r"consumed 9 batches of epoch 0, but FirstTwenty yields 5"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with recoverkit.protect(root, loader=lazy, save_every=9) as run:
                next(iter(run))


class FirstTwenty(Sampler[int]):
    def __iter__(self):
        return iter(range(20))


def _emit(event) -> None:
    print(json.dumps(event), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind_, mode_, root_ = sys.argv[1:4]
    nums = [int(a) for a in sys.argv[4:]]
    if mode_ == "plain":
        for item in plain(kind_):
            _emit({"event": "step", "batch": item})
    else:
        protected(kind_, root_, die_at=nums[0] if nums else -1, save_every=nums[1] if len(nums) > 1 else 3, emit=_emit)
