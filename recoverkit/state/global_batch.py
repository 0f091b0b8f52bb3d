"""The global batch sampler: which samples each step trains on, whatever the world size.

Where it sits: it decides the data side of a data-parallel step, and its state is the data
position a checkpoint saves (a Stateful entry like :class:`~recoverkit.state.sampler.DataPosition`).
Elastic training stands on it: when a rank is lost or joins, the *global* batches stay the
same and only their split over the ranks changes, so no sample is skipped or seen twice
within the epoch and the optimizer sees the same effective batch.

The flow, per epoch ``e`` and step ``k`` of the epoch:

1. ``order(e)``: a permutation of ``range(num_samples)`` drawn from ``(seed, e)`` alone
   (``torch.randperm`` with a generator seeded by ``keyed_seed(seed, ORDER_KEY, e)``);
   ``0, 1, 2, ...`` without shuffling.
2. ``global_batch(k)``: positions ``[k*G, (k+1)*G)`` of that order (``G = global_batch``).
3. ``micro_batches(k)``: the global batch cut into ``G/m`` micro-batches of ``m`` samples,
   with global micro-batch indices ``0 .. G/m - 1``; they do not depend on the world size.
4. ``assign(k, rank, world_size)``: the rank's share, a contiguous, balanced run of micro-
   batches: with ``M`` micro-batches and ``W`` ranks, ``q, r = divmod(M, W)``; ranks
   ``0 .. r-1`` get ``q + 1`` micro-batches and the others ``q``, in rank order (rank
   ``i`` starts at ``i*q + min(i, r)``). Any ``W`` works; with ``W > M`` the last ranks get
   none that step (their gradient contribution is zero).

Gradients are then normalized by ``batch_size(k)`` (the global sample count), never by the
number of live ranks: :mod:`recoverkit.distributed.global_grad`. Random draws per micro-
batch are keyed by ``MicroBatch.key``: :func:`~recoverkit.state.keyed_rng.keyed_rng`.

The loop calls :meth:`GlobalBatchSampler.advance` after each optimizer step; the state
(``epoch``, ``step``, seed and sizes, never the world size) is what was consumed, so a
DataLoader that prefetches does not move it. Example, one rank of a world of ``W``::

    sampler = GlobalBatchSampler(len(ds), global_batch=256, micro_batch=16, seed=0)
    state = {"model": model, "optimizer": opt, "data": sampler}
    ckpt.restore(state)                           # resumes at any world size
    while sampler.epoch < epochs:
        for mb in sampler.assign(sampler.step, rank, W):
            with keyed_rng(seed, *mb.key):
                loss = loss_fn(model(x[mb.samples]), y[mb.samples], reduction="sum")
            (loss / sampler.batch_size(sampler.step)).backward()
        allreduce_grads_sum(model.parameters())
        opt.step(); opt.zero_grad()
        sampler.advance()
        ckpt.save(step, state)

With a DataLoader, ``DataLoader(ds, batch_sampler=sampler.rank_batches(rank, W))`` yields
the rank's micro-batches in the same order as ``assign`` lists them, step after step, from
the position to the end of the epoch. With ``protect()``, pass a :class:`GlobalBatchLoader`:
each item is one step's :class:`StepBatch` (micro-batches with their keys and data), and
the loader saves the sampler's state as its own, so a resume continues at the same global
step at any world size::

    loader = GlobalBatchLoader(ds, sampler, rank, W, num_workers=2)
    with recoverkit.protect(root, model=model, optimizer=opt, loader=loader) as run:
        for step_batch in run:
            for mb, (x, y) in step_batch:
                with keyed_rng(seed, *mb.key):
                    loss = loss_fn(model(x), y, reduction="sum") / step_batch.batch_size
                loss.backward()
            ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import IncompatibleCheckpointError
from .keyed_rng import keyed_seed

__all__ = [
    "GlobalBatchSampler",
    "GlobalBatchLoader",
    "MicroBatch",
    "StepBatch",
    "RankBatchSampler",
    "split_micro_batches",
]

#: the key part that separates the epoch-order stream from any user stream of the same seed
ORDER_KEY = "recoverkit.global_batch.order"
_KEYS = (
    "epoch",
    "step",
    "seed",
    "shuffle",
    "num_samples",
    "global_batch",
    "micro_batch",
    "drop_last",
)
_SIZES = ("num_samples", "global_batch", "micro_batch", "drop_last")
_SEED_MIN, _SEED_END = -(1 << 127), 1 << 127
_EPOCH_END = 1 << 63


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a step: its global index within the step and its sample indices.

    ``key`` (``(epoch, step, index)``) names it independently of the rank that runs it: pass
    it to :func:`~recoverkit.state.keyed_rng.keyed_rng`.
    """

    index: int
    samples: tuple[int, ...]
    epoch: int = 0
    step: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.epoch, self.step, self.index)

    def __len__(self) -> int:
        return len(self.samples)


def split_micro_batches(num_micro_batches: int, rank: int, world_size: int) -> range:
    """The global micro-batch indices rank ``rank`` of ``world_size`` runs (the rule above).

    Example:
        >>> [list(split_micro_batches(5, r, 3)) for r in range(3)]
        [[0, 1], [2, 3], [4]]
    """
    if (
        type(world_size) is not int
        or world_size < 1
        or type(rank) is not int
        or not 0 <= rank < world_size
    ):
        raise ValueError(
            f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}"
        )
    if num_micro_batches < 0:
        raise ValueError(f"num_micro_batches must be >= 0, got {num_micro_batches}")
    q, r = divmod(num_micro_batches, world_size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))


class GlobalBatchSampler:
    """Global batches fixed by ``(seed, epoch)``; each rank's share by the split rule.

    Args:
        num_samples: the dataset's length.
        global_batch: samples per optimizer step over all ranks (``G``).
        micro_batch: samples per micro-batch (``m``); ``G`` must be a multiple of it.
        seed: the base seed of the epoch orders.
        shuffle: a fresh permutation per epoch; else ``0, 1, 2, ...``.
        drop_last: drop the samples that do not fill a last global batch; otherwise the
            last step is shorter (fewer micro-batches, the last one possibly shorter:
            normalize by :meth:`batch_size`).

    ``epoch`` and ``step`` (the next step of the epoch to run) are the position; a finished
    epoch is saved as the start of the next one.

    Example:
        >>> s = GlobalBatchSampler(12, global_batch=6, micro_batch=2, shuffle=False)
        >>> [mb.samples for mb in s.assign(0, rank=0, world_size=2)]
        [(0, 1), (2, 3)]
        >>> [mb.samples for mb in s.assign(0, rank=1, world_size=2)]
        [(4, 5)]
        >>> s.advance(); (s.epoch, s.step)
        (0, 1)
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        for name, v in (
            ("num_samples", num_samples),
            ("global_batch", global_batch),
            ("micro_batch", micro_batch),
        ):
            if type(v) is not int or v < (0 if name == "num_samples" else 1):
                raise ValueError(
                    f"GlobalBatchSampler: {name} must be a {'non-negative' if name == 'num_samples' else 'positive'} int, got {v!r}"
                )
        if global_batch % micro_batch:
            raise ValueError(
                f"GlobalBatchSampler: global_batch {global_batch} is not a multiple of micro_batch {micro_batch}"
            )
        if type(seed) is not int or not _SEED_MIN <= seed < _SEED_END:
            raise ValueError(
                f"GlobalBatchSampler: seed must be an int within +-2**127, got {seed!r}"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.step = 0
        self._cached: tuple[tuple[int, int, bool], list[int]] | None = None

    # ------------------------------------------------------------------ the fixed plan

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch
        return math.ceil(self.num_samples / self.global_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``: a function of ``(seed, epoch)`` (and ``shuffle``)."""
        cache_key = (self.seed, epoch, self.shuffle)
        if self._cached is not None and self._cached[0] == cache_key:
            return self._cached[1]
        if self.shuffle:
            g = torch.Generator().manual_seed(keyed_seed(self.seed, ORDER_KEY, epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        self._cached = (cache_key, order)
        return order

    def _check_step(self, step: int) -> None:
        if type(step) is not int or not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step!r} is outside the epoch's {self.steps_per_epoch} steps")

    def batch_size(self, step: int) -> int:
        """Samples in global batch ``step``: ``G``, or fewer for a last, partial one.
        The gradient normalizer of that step."""
        self._check_step(step)
        return min(self.global_batch, self.num_samples - step * self.global_batch)

    def global_batch_samples(self, step: int, epoch: int | None = None) -> list[int]:
        """The sample indices of global batch ``step`` of ``epoch`` (default: the current)."""
        self._check_step(step)
        order = self.order(self.epoch if epoch is None else epoch)
        return order[step * self.global_batch : step * self.global_batch + self.batch_size(step)]

    def micro_batches(self, step: int, epoch: int | None = None) -> list[MicroBatch]:
        """Global batch ``step`` cut into micro-batches, indices ``0 .. G/m - 1``."""
        e = self.epoch if epoch is None else epoch
        samples = self.global_batch_samples(step, e)
        m = self.micro_batch
        return [
            MicroBatch(i, tuple(samples[i * m : (i + 1) * m]), e, step)
            for i in range(math.ceil(len(samples) / m))
        ]

    def assign(
        self, step: int, rank: int, world_size: int, epoch: int | None = None
    ) -> list[MicroBatch]:
        """Rank ``rank``'s micro-batches of ``step`` in a world of ``world_size`` (module rule);
        their union over the ranks is the whole global batch, for any ``world_size``."""
        mbs = self.micro_batches(step, epoch)
        return [mbs[i] for i in split_micro_batches(len(mbs), rank, world_size)]

    # ------------------------------------------------------------------ the position

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch``: from its start, or, if it is the current epoch, from the current step."""
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def advance(self, steps: int = 1) -> None:
        """Record that ``steps`` more steps were trained; rolls over into the next epoch."""
        if type(steps) is not int or steps < 0:
            raise ValueError(f"advance() takes a non-negative int, got {steps!r}")
        self.step += steps
        n = self.steps_per_epoch
        while n and self.step >= n:
            self.epoch, self.step = self.epoch + 1, self.step - n

    def rank_batches(self, rank: int, world_size: int) -> RankBatchSampler:
        """A batch sampler for this rank's DataLoader (see :class:`RankBatchSampler`)."""
        return RankBatchSampler(self, rank, world_size)

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "step", "seed", "shuffle", "num_samples", "global_batch", "micro_batch",
        "drop_last"}``; the world size is not part of it."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "drop_last": self.drop_last,
        }

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``state_dict`` is a well-formed
        state for this sampler's sizes (the state is hostile input: types, ranges, keys)."""
        if not isinstance(state_dict, dict):
            raise IncompatibleCheckpointError(
                f"global batch sampler state must be a dict, got {type(state_dict).__name__}"
            )
        keys = set(map(str, state_dict))
        if keys != set(_KEYS) or not all(isinstance(k, str) for k in state_dict):
            raise IncompatibleCheckpointError(
                f"global batch sampler state needs keys {sorted(_KEYS)}; missing "
                f"{sorted(set(_KEYS) - keys)}, unexpected {sorted(keys - set(_KEYS))[:8]}"
            )
        for k in _KEYS:
            want = bool if k in ("shuffle", "drop_last") else int
            if type(state_dict[k]) is not want:
                raise IncompatibleCheckpointError(
                    f"global batch sampler state: {k!r} must be {want.__name__}, got "
                    f"{type(state_dict[k]).__name__} {repr(state_dict[k])[:40]}"
                )
        mine = {k: getattr(self, k) for k in _SIZES}
        theirs = {k: state_dict[k] for k in _SIZES}
        if mine != theirs:
            raise IncompatibleCheckpointError(
                f"global batch sampler state is for {theirs}; this sampler has {mine}: the dataset "
                "or the batch sizes changed since the save"
            )
        if not 0 <= state_dict["epoch"] < _EPOCH_END:
            raise IncompatibleCheckpointError(
                f"global batch sampler state: epoch {state_dict['epoch']} is out of range"
            )
        if not 0 <= state_dict["step"] <= self.steps_per_epoch:
            raise IncompatibleCheckpointError(
                f"global batch sampler state: step {state_dict['step']} is outside 0..{self.steps_per_epoch}"
            )
        if not _SEED_MIN <= state_dict["seed"] < _SEED_END:
            raise IncompatibleCheckpointError(
                f"global batch sampler state: seed {state_dict['seed']} is outside +-2**127"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved epoch and step with the saved seed and shuffle."""
        self.validate_state_dict(state_dict)
        self.seed, self.shuffle = state_dict["seed"], state_dict["shuffle"]
        self.epoch, self.step = state_dict["epoch"], 0
        self.advance(state_dict["step"])  # a finished epoch becomes the next one's start


class RankBatchSampler(Sampler[list[int]]):
    """One rank's micro-batches as a DataLoader ``batch_sampler``, for loops that drive the
    sampler themselves (with ``protect()``, use :class:`GlobalBatchLoader`).

    Iterating yields the sample lists of ``assign(k, rank, world_size)`` for ``k`` from the
    sampler's position (read when the iteration starts) to the end of its epoch, micro-batch
    after micro-batch. It never moves the position (the loop's
    :meth:`GlobalBatchSampler.advance` does), so a prefetching DataLoader cannot make a save
    skip samples. :meth:`plan` lists the same micro-batches as :class:`MicroBatch` objects
    (with their keys), in the same order. It keeps no state: save the sampler itself.
    """

    def __init__(self, sampler: GlobalBatchSampler, rank: int, world_size: int) -> None:
        split_micro_batches(0, rank, world_size)  # validates rank and world_size
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size

    def plan(self) -> list[MicroBatch]:
        """This rank's micro-batches from the current position to the end of the epoch."""
        s = self.sampler
        return [
            mb
            for k in range(s.step, s.steps_per_epoch)
            for mb in s.assign(k, self.rank, self.world_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(mb.samples) for mb in self.plan()])  # fixed when iteration starts

    def __len__(self) -> int:
        s = self.sampler
        total = 0
        for k in range(s.step, s.steps_per_epoch):
            n = math.ceil(s.batch_size(k) / s.micro_batch)
            total += len(split_micro_batches(n, self.rank, self.world_size))
        return total

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


@dataclass(frozen=True)
class StepBatch:
    """What one rank trains on in one step: its micro-batches with their loaded data.

    ``batch_size`` is the step's *global* sample count, the loss normalizer. Iterating
    yields ``(MicroBatch, data)`` pairs in global micro-batch order.
    """

    epoch: int
    step: int
    batch_size: int
    micro_batches: tuple[tuple[MicroBatch, Any], ...]

    def __iter__(self) -> Iterator[tuple[MicroBatch, Any]]:
        return iter(self.micro_batches)

    def __len__(self) -> int:
        return len(self.micro_batches)


class _PlanSampler(Sampler[list[int]]):
    def __init__(self, plan: list[list[int]]) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class GlobalBatchLoader:
    """One rank's steps for ``protect()`` (or any loop): an iterable of :class:`StepBatch`
    that saves its own, world-size-independent position.

    Args:
        dataset: a map-style dataset.
        sampler: the :class:`GlobalBatchSampler` (its state is this loader's state).
        rank, world_size: this rank's place in the current world.
        **loader_kwargs: passed to the ``DataLoader`` that loads the micro-batches
            (``num_workers``, ``collate_fn``, ``pin_memory`` ...; not ``batch_size``,
            ``sampler``, ``batch_sampler`` or ``shuffle``).

    Iterating yields the steps from the sampler's position to the end of its epoch and
    advances the sampler as each step is handed out: a step handed out counts as consumed,
    which is what ``protect()`` needs (it saves after the step's work is done; this is
    torchdata's ``StatefulDataLoader`` contract, and protect keeps such a loader as it is
    and saves its ``state_dict``). Micro-batch data is loaded by a DataLoader that may
    prefetch; that never moves the position. :meth:`set_world` changes the rank and world
    size for the next iteration (a shrink or a grow at a step boundary): the global batches
    stay the same and the state needs nothing else, being the sampler's.

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(12.0))
        >>> s = GlobalBatchSampler(12, global_batch=6, micro_batch=2, shuffle=False)
        >>> loader = GlobalBatchLoader(ds, s, rank=1, world_size=2)
        >>> [[mb.index for mb, _ in step] for step in loader]
        [[2], [2]]
        >>> loader.state_dict()["epoch"], loader.state_dict()["step"]
        (1, 0)
    """

    def __init__(
        self,
        dataset: Any,
        sampler: GlobalBatchSampler,
        rank: int,
        world_size: int,
        **loader_kwargs: Any,
    ) -> None:
        bad = {"batch_size", "sampler", "batch_sampler", "shuffle", "drop_last"} & set(
            loader_kwargs
        )
        if bad:
            raise ValueError(f"GlobalBatchLoader decides {sorted(bad)} itself")
        self.dataset = dataset
        self.sampler = sampler
        self.loader_kwargs = loader_kwargs
        self.rank, self.world_size = 0, 1
        self.set_world(rank, world_size)

    def set_world(self, rank: int, world_size: int) -> None:
        """This rank's place from the next iteration on (any world size)."""
        split_micro_batches(0, rank, world_size)  # validates
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return self.sampler.steps_per_epoch - self.sampler.step

    def __iter__(self) -> Iterator[StepBatch]:
        s = self.sampler
        epoch = s.epoch
        steps = [(k, s.assign(k, self.rank, self.world_size)) for k in range(s.step, len(s))]
        plan = [list(mb.samples) for _, mbs in steps for mb in mbs]
        data = iter(())
        if plan:
            loader = DataLoader(
                self.dataset, batch_sampler=_PlanSampler(plan), **self.loader_kwargs
            )
            data = iter(loader)
        return self._run(epoch, steps, data)

    def _run(
        self, epoch: int, steps: list[tuple[int, list[MicroBatch]]], data: Iterator[Any]
    ) -> Iterator[StepBatch]:
        s = self.sampler
        for k, mbs in steps:
            pairs = tuple((mb, next(data)) for mb in mbs)
            if (s.epoch, s.step) != (epoch, k):
                raise RuntimeError(
                    f"the sampler moved to epoch {s.epoch} step {s.step} while the loader was at "
                    f"epoch {epoch} step {k}: do not call advance() when GlobalBatchLoader drives it"
                )
            size = s.batch_size(k)
            s.advance()  # handed out = consumed
            yield StepBatch(epoch, k, size, pairs)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def validate_state_dict(self, state_dict: Any) -> None:
        self.sampler.validate_state_dict(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state_dict)
