"""Plain PyTorch adapters: resume a DataLoader (or any iterable) exactly where the loop was.

``recoverkit.protect`` uses these; they are public for loops that drive a
:class:`~recoverkit.Checkpointer` themselves.

The user's sampling is kept exactly: the loader yields the very batches it would yield on
its own, epoch by epoch, and the data position that is saved lets a resumed run go on with
exactly the batches the interrupted one had not consumed yet. How, by kind of loader:

* **A DataLoader over a map-style dataset** (``sampler=``, ``shuffle=``, ``batch_sampler=``,
  ``DistributedSampler``, ``SubsetRandomSampler``, ``WeightedRandomSampler`` ...): it is
  rebuilt with the same arguments over a :class:`~recoverkit.state.sampler.ReplaySampler`
  that wraps the loader's own (batch) sampler and yields what it yields. At the start of an
  epoch it calls ``set_epoch(epoch)`` on the sampler (and the samplers it wraps), as a
  hand-written loop would, and snapshots what the epoch's order depends on: the global
  random streams (a ``RandomSampler`` without a generator seeds itself from torch's), the
  ``torch.Generator`` objects of the loader and its samplers, and the sampler's own
  ``state_dict()`` if it has one. A resumed run draws the epoch again from that snapshot
  and skips the batches already consumed without loading them (replay mode). torch's
  samplers (sequential, random with or without replacement, subset, weighted,
  distributed, ``BatchSampler`` over any of these) are exact this way.
* **A sampler recoverkit does not know** and that has no ``state_dict()``: it is replayed
  the same way (iterated lazily, as the DataLoader would), with a warning naming it: if it
  keeps state of its own or draws from another random source, a resumed epoch can differ.
* **An IterableDataset, a DataLoader subclass, or any other iterable**: kept as it is. A
  resumed run iterates it again from the random state the epoch began with and drops the
  batches already consumed (count mode): exact when the stream is a function of that
  state and the epoch (``set_epoch(epoch)`` is called on a dataset that has one), but
  the dropped batches are read again.

Worker processes of a resumed run start afresh: datasets whose ``__getitem__`` draws random
numbers in workers should derive them from the sample index. With
``persistent_workers=True`` the workers of a resumed run are started for its first epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from ..errors import IncompatibleCheckpointError
from .sampler import EpochStreams, ReplaySampler, set_epoch_chain, skip_consumed

__all__ = ["resumable_loader", "ResumableLoader", "LoaderPosition"]

# Samplers whose order is a function of their attributes, their generator and the global
# streams at the start of the epoch (their __iter__, not their class, is what counts).
_EXACT_ITERS = {
    c.__iter__
    for c in (
        SequentialSampler,
        RandomSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
        DistributedSampler,
    )
}
_EXACT_TYPES = (list, tuple, range)


class ResumableLoader:
    """A loader that yields each epoch's batches from the saved position on.

    Iterate :meth:`epoch_batches` once per epoch (``protect`` does); ``position`` is the
    Stateful to save, and ``loader`` the DataLoader (or iterable) that is iterated.
    """

    def __init__(self, loader: Any, position: LoaderPosition, replay: ReplaySampler | None) -> None:
        self.loader = loader
        self.position = position
        self.replay = replay
        self.batch_size = getattr(loader, "batch_size", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self.epoch_batches()

    def epoch_batches(self) -> Iterator[Any]:
        """The rest of the position's epoch: all of it, or (resumed) what was not consumed.

        The position is not advanced here: the loop calls ``position.advance()`` for each
        batch it used, and ``position.next_epoch()`` when this iterator ends.
        """
        pos = self.position
        resume = pos.index > 0
        if resume and pos.start is None:
            raise ValueError(
                f"data position {pos.index} batches into epoch {pos.epoch} has no start snapshot"
            )
        dataset = getattr(self.loader, "dataset", None)
        set_epoch = getattr(dataset, "set_epoch", None)
        if isinstance(dataset, IterableDataset) and callable(set_epoch):
            set_epoch(pos.epoch)
        streams = pos.streams
        now = (
            streams.capture() if resume else None
        )  # the global streams restored with the checkpoint
        if self.replay is not None:
            neutral = None
            if not resume and pos.epoch > 0 and _creates_persistent_workers(self.loader):
                # the uninterrupted run drew its workers' seed at epoch 0 only: undo this draw
                neutral = streams.capture()
            self.replay.begin(pos.epoch, skip=pos.index, replay=pos.start if resume else neutral)
            it = iter(self.loader)
            self.replay.prime()
            pos.start = self.replay.start
        else:
            for s in (
                getattr(self.loader, "batch_sampler", None),
                getattr(self.loader, "sampler", None),
            ):
                set_epoch_chain(s, pos.epoch)
            if resume:
                assert pos.start is not None
                streams.set(pos.start)
            else:
                pos.start = streams.capture()
            it = skip_consumed(iter(self.loader), pos.index, epoch=pos.epoch, what="the loader")
        if now is not None:
            streams.set_global(now)
        return it



def _creates_persistent_workers(loader: Any) -> bool:
    return (
        isinstance(loader, DataLoader)
        and bool(loader.persistent_workers)
        and loader.num_workers > 0
        and loader._iterator is None
    )


class LoaderPosition:
    """How many batches of the current epoch the loop consumed, and what the epoch was drawn from.

    Args:
        streams: the random sources the loader's order depends on.
        mode: ``"replay"`` (the epoch's order is drawn again from ``start`` and the consumed
            part skipped without loading it) or ``"count"`` (the loader is iterated again
            from ``start`` and the consumed batches are read and dropped).
        epoch_length: the current epoch's batch count once it is known, or ``None``.
        size: the batches an epoch has, if the loader can tell before drawing it (checked
            against a loaded position, so a changed dataset is refused before anything moves).

    ``start`` is the snapshot (:meth:`EpochStreams.capture`) taken when the current epoch
    began; it is saved while the epoch is under way, so a resume draws the same order. A
    finished epoch is saved as the start of the next one when its length is known.
    """

    def __init__(
        self,
        streams: EpochStreams,
        *,
        mode: str,
        epoch_length: Callable[[int], int | None] | None = None,
        size: Callable[[], int | None] | None = None,
    ) -> None:
        if mode not in ("replay", "count"):
            raise ValueError(f"mode must be 'replay' or 'count', got {mode!r}")
        self.streams = streams
        self.mode = mode
        self.epoch_length = epoch_length
        self.size = size
        self.epoch = 0
        self.index = 0
        self.start: dict[str, Any] | None = None

    def advance(self, n: int = 1) -> None:
        """Record that the loop consumed ``n`` more batches."""
        self.index += int(n)

    def next_epoch(self) -> None:
        """The current epoch ended: the next one starts from its beginning."""
        self.epoch, self.index, self.start = self.epoch + 1, 0, None

    def state_dict(self) -> dict[str, Any]:
        """``{"mode", "epoch", "index", "start", "now"}`` (``start`` only mid-epoch)."""
        epoch, index, start = self.epoch, self.index, self.start
        n = self.epoch_length(epoch) if self.epoch_length is not None and index else None
        if n is not None and index >= n:
            epoch, index = epoch + 1, 0
        return {
            "mode": self.mode,
            "epoch": epoch,
            "index": index,
            "start": start if index else None,
            "now": self.streams.now(),
        }

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``state_dict`` fits this loader."""
        if not isinstance(state_dict, dict) or "mode" not in state_dict:
            keys = (
                sorted(map(str, state_dict))[:8]
                if isinstance(state_dict, dict)
                else type(state_dict).__name__
            )
            raise IncompatibleCheckpointError(
                f"data position needs keys ['epoch', 'index', 'mode', 'now', 'start'], got {keys} (a position "
                "saved by a recoverkit that replaced the loader's sampler cannot be mapped onto the loader's own)"
            )
        if set(state_dict) != {"mode", "epoch", "index", "start", "now"}:
            raise IncompatibleCheckpointError(
                f"data position has keys {sorted(map(str, state_dict))[:8]}"
            )
        if state_dict["mode"] != self.mode:
            raise IncompatibleCheckpointError(
                f"data position was saved in {state_dict['mode']!r} mode; this loader resumes in {self.mode!r} mode"
            )
        epoch, index = state_dict["epoch"], state_dict["index"]
        if (
            type(epoch) is not int
            or type(index) is not int
            or epoch < 0
            or not 0 <= index < 1 << 62
        ):
            raise IncompatibleCheckpointError(
                f"data position epoch={epoch!r} index={index!r} is out of range"
            )
        size = self.size() if self.size is not None else None
        if size is not None and index > size:
            raise IncompatibleCheckpointError(
                f"data position is {index} batches into epoch {epoch}, but the loader has {size} batches an "
                "epoch: the dataset or the sampler changed since the save"
            )
        self.streams.validate(state_dict["now"], "'now'", whole=False)
        if index:
            if state_dict["start"] is None:
                raise IncompatibleCheckpointError(
                    f"data position {index} batches into epoch {epoch} has no 'start'"
                )
            self.streams.validate(state_dict["start"], "'start'", whole=True)
        elif state_dict["start"] is not None:
            raise IncompatibleCheckpointError(
                "data position at the start of an epoch holds a 'start' snapshot"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved epoch and batch; the generators and sampler are set as saved."""
        self.validate_state_dict(state_dict)
        self.streams.set_now(state_dict["now"])
        self.epoch, self.index, self.start = (
            state_dict["epoch"],
            state_dict["index"],
            state_dict["start"],
        )


def _size(sampler: Any) -> int | None:
    try:
        return len(sampler)
    except TypeError:
        return None


def _chain(sampler: Any) -> list[Any]:
    """``sampler`` and what it wraps: a BatchSampler's sampler, recursively."""
    chain = [sampler]
    while (
        type(chain[-1]).__iter__ is BatchSampler.__iter__
        and getattr(chain[-1], "sampler", None) is not None
    ):
        chain.append(chain[-1].sampler)
    return chain


def _classify(loader: DataLoader, index_sampler: Any) -> tuple[list[torch.Generator], Any, bool]:
    """The generators the order draws from, the stateful sampler (or None), and whether the
    sampler is one recoverkit knows to be exact. Warns about one it cannot see into."""
    chain = _chain(index_sampler) if index_sampler is not None else []
    generators: list[torch.Generator] = []
    for obj in (loader, *chain):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in generators):
            generators.append(g)
    leaf = chain[-1] if chain else None
    known = leaf is None or isinstance(leaf, _EXACT_TYPES) or type(leaf).__iter__ in _EXACT_ITERS
    known = known or type(leaf).__name__ == "_InfiniteConstantSampler"
    stateful = None
    if not known:
        for obj in chain:
            if callable(getattr(obj, "state_dict", None)) and callable(
                getattr(obj, "load_state_dict", None)
            ):
                stateful = obj
                break
        if stateful is None:
            name = type(leaf).__name__
            warnings.warn(
                f"recoverkit cannot see inside the sampler {name}: to resume mid-epoch, protect() iterates {name} "
                f"again with the random streams (Python, NumPy, torch, the loader's generators) as they were when "
                f"the epoch began and skips the batches already consumed. If {name} keeps state of its own (give it "
                f"state_dict()/load_state_dict() to have it saved) or draws from another source, a resumed epoch can "
                f"differ from the interrupted one.",
                UserWarning,
                stacklevel=3,
            )
    return generators, stateful, known


def resumable_loader(loader: Any, **_unused: Any) -> tuple[ResumableLoader, LoaderPosition]:
    """Wrap ``loader`` to resume exactly; return it and the position to checkpoint.

    See the module docstring for what each kind of loader does. The old ``seed``, ``rank``
    and ``world_size`` arguments are accepted and ignored: the loader's own sampler (a
    ``DistributedSampler`` for sharding) and generator decide the order.

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0))
        >>> user = DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler([0, 2, 4, 6, 8]))
        >>> loader, position = resumable_loader(user)
        >>> sorted(i for (b,) in loader.epoch_batches() for i in b.int().tolist())
        [0, 2, 4, 6, 8]
    """
    if (
        not isinstance(loader, DataLoader)
        or isinstance(loader.dataset, IterableDataset)
        or type(loader) is not DataLoader
    ):
        generators: list[torch.Generator] = []
        stateful = None
        if isinstance(loader, DataLoader):
            index_sampler = (
                loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
            )
            generators, stateful, _ = _classify(loader, index_sampler)
        position = LoaderPosition(EpochStreams(generators, stateful), mode="count")
        return ResumableLoader(loader, position, None), position
    index_sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    generators, stateful, known = _classify(loader, index_sampler)
    streams = EpochStreams(generators, stateful)
    replay = ReplaySampler(index_sampler, streams, eager=known)
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    if getattr(loader, "pin_memory_device", ""):
        kwargs["pin_memory_device"] = loader.pin_memory_device
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    if loader.batch_sampler is not None:
        rebuilt = DataLoader(loader.dataset, batch_sampler=replay, **kwargs)
    else:
        rebuilt = DataLoader(loader.dataset, batch_size=None, sampler=replay, **kwargs)
    position = LoaderPosition(
        streams,
        mode="replay",
        epoch_length=lambda e: replay.length if replay.epoch == e else None,
        size=lambda: _size(replay) if known else None,
    )
    return ResumableLoader(rebuilt, position, replay), position
