"""The data position: which samples the run has consumed, so a resume continues exactly.

Save data flow: the data position is one more Stateful entry of the state that ``capture``
records (rank-local in a multi-rank world); restore puts it back before the loop goes on.

:class:`ResumableSampler` yields a deterministic permutation per epoch (seeded with
``seed + epoch``) and counts how many indices of the epoch it has handed out.
:class:`DataPosition` counts what the training loop has actually *consumed*. The two differ
as soon as a ``DataLoader`` prefetches:

* The DataLoader draws indices from its sampler in the **main process**, also with
  ``num_workers > 0``; workers only receive lists of indices. To keep the workers busy it
  draws ``prefetch_factor * num_workers`` batches ahead, so the sampler's own position runs
  ahead of the loop by up to that many batches. Saving the sampler alone would skip those
  samples on resume.
* What the loop consumed is exactly ``sum(len(batch))`` over the batches it received (the
  sampler's order is fixed, and batches arrive in sampler order even with several
  workers). :meth:`DataPosition.advance` adds that up; its state is the sampler's state
  with ``epoch``/``index`` replaced by the consumed position. Loading it rewinds the
  sampler, so the next iteration starts at the first unconsumed sample.

So, with a DataLoader, register the :class:`DataPosition` (not the sampler) in the state::

    sampler = ResumableSampler(dataset, seed=0)
    position = DataPosition(sampler)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=4)
    state = {"model": model, "optimizer": opt, "data": position}
    ckpt.restore(state)                       # if a checkpoint exists
    for epoch in range(position.epoch, epochs):
        sampler.set_epoch(epoch)              # the current epoch keeps its position
        for batch in loader:
            train_step(batch)
            position.advance(len(batch))      # after the step the batch was used in
            ckpt.save(step, state)

Without prefetching (``num_workers=0``, or iterating the sampler directly) the sampler's
own position equals what was consumed, and the sampler can be registered directly.

``protect()`` keeps the *user's* sampler instead (``recoverkit.integrations.pytorch``):
:class:`ReplaySampler` wraps it and yields exactly what it yields; :class:`EpochStreams`
snapshots what an epoch's order is drawn from (the global random streams, the loader's and
sampler's generators, a stateful sampler's own state) when the epoch begins; and
:class:`~recoverkit.integrations.pytorch.LoaderPosition` saves the batches consumed of the epoch with that snapshot, so a
resume draws the same epoch again and skips what was consumed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import IncompatibleCheckpointError
from .rng import RNGState

__all__ = [
    "ResumableSampler",
    "DataPosition",
    "EpochStreams",
    "ReplaySampler",
    "set_epoch_chain",
    "skip_consumed",
]

_INT_KEYS = ("epoch", "index", "seed", "length", "num_replicas")
_SEED_MIN, _SEED_END = -(1 << 63), 1 << 64  # what torch.Generator.manual_seed takes


class ResumableSampler(Sampler[int]):
    """A random (or sequential) sampler that resumes mid-epoch exactly.

    Args:
        data_source_or_len: the dataset (anything with ``len``) or its length.
        shuffle: a fresh permutation per epoch from ``torch.Generator().manual_seed(seed +
            epoch)``; otherwise ``0, 1, 2, ...``.
        seed: the base seed.
        drop_last: with ``num_replicas > 1``, drop the tail so every replica gets
            ``len // num_replicas`` samples (otherwise the permutation is padded by wrapping,
            as ``DistributedSampler`` does). No effect with one replica.
        num_replicas: ranks that split each epoch's permutation (rank ``r`` takes positions
            ``r, r + num_replicas, ...``).
        rank: this rank.

    Iterating yields the rest of the current epoch from ``index``; iterating again once an
    epoch is finished starts the next one, unless :meth:`set_epoch` named the epoch to
    iterate. ``index`` counts the indices handed out, raised as each one is yielded. A
    finished epoch is saved as the start of the next one, so a resumed
    ``for epoch in range(saved["epoch"], epochs)`` loop neither repeats nor skips an epoch.

    Example:
        >>> s = ResumableSampler(6, seed=1)
        >>> it = iter(s); first = [next(it), next(it)]
        >>> saved = s.state_dict()
        >>> rest = list(it)
        >>> s2 = ResumableSampler(6); s2.load_state_dict(saved)
        >>> list(s2) == rest
        True
    """

    def __init__(
        self,
        data_source_or_len: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        n = data_source_or_len if isinstance(data_source_or_len, int) else len(data_source_or_len)
        if n < 0 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need length >= 0 and 0 <= rank < num_replicas, got {n}, {rank}, {num_replicas}"
            )
        self.length = n
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.index = 0
        self._generation = 0  # bumped when the position is moved; stale iterators stop
        self._pinned = False  # set_epoch named the epoch the next iteration yields
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Indices per epoch for this rank (a whole epoch, wherever the position is)."""
        return self._num_samples(self.drop_last)

    def _num_samples(self, drop_last: bool) -> int:
        if self.num_replicas == 1:
            return self.length
        if drop_last:
            return self.length // self.num_replicas
        return math.ceil(self.length / self.num_replicas)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in the order they are yielded."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        total = len(self) * self.num_replicas
        if total > len(perm) and perm:
            perm = (perm * math.ceil(total / len(perm)))[:total]
        order = perm[self.rank : total : self.num_replicas]
        self._cached = (epoch, order)
        return order

    def __iter__(self) -> Iterator[int]:
        if len(self) and self.index >= len(self) and not self._pinned:
            self.epoch, self.index = self.epoch + 1, 0
        self._pinned = False
        self._generation += 1
        return self._run(self._generation, self.order(self.epoch))

    def _run(self, generation: int, order: list[int]) -> Iterator[int]:
        while self._generation == generation and self.index < len(order):
            i = order[self.index]
            self.index += 1
            yield i

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next: from its start, or, if it is the current epoch, from the
        current position (a resumed loop calls this; a finished epoch then yields nothing)."""
        if epoch != self.epoch:
            self.epoch, self.index = int(epoch), 0
            self._generation += 1
        self._pinned = True

    def resume_point(self, epoch: int, index: int) -> tuple[int, int]:
        """``(epoch, index)`` as saved: the end of an epoch becomes the start of the next."""
        n = self._num_samples(self.drop_last)
        return (epoch + 1, 0) if n and index >= n else (epoch, index)

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "index", "seed", "shuffle", "length", "num_replicas", "drop_last"}``."""
        epoch, index = self.resume_point(self.epoch, self.index)
        return {
            "epoch": epoch,
            "index": index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "length": self.length,
            "num_replicas": self.num_replicas,
            "drop_last": self.drop_last,
        }

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``state_dict`` fits this sampler."""
        if not isinstance(state_dict, dict):
            raise IncompatibleCheckpointError(
                f"sampler state must be a dict, got {type(state_dict).__name__}"
            )
        sd = {"num_replicas": 1, "drop_last": False, **state_dict}
        missing = [k for k in ("epoch", "index", "seed", "shuffle", "length") if k not in sd]
        if (
            missing
            or any(type(sd[k]) is not int for k in _INT_KEYS)
            or any(type(sd[k]) is not bool for k in ("shuffle", "drop_last"))
        ):
            raise IncompatibleCheckpointError(
                f"sampler state is malformed (missing {missing}): {repr(state_dict)[:120]}"
            )
        if sd["length"] != self.length or sd["num_replicas"] != self.num_replicas:
            raise IncompatibleCheckpointError(
                f"sampler state is for {sd['length']} samples over {sd['num_replicas']} replica(s); this "
                f"sampler has {self.length} over {self.num_replicas}"
            )
        if not 0 <= sd["index"] <= self._num_samples(bool(sd["drop_last"])) or sd["epoch"] < 0:
            raise IncompatibleCheckpointError(
                f"sampler position epoch={sd['epoch']} index={sd['index']} is out of range"
            )
        if not _SEED_MIN <= sd["seed"] + sd["epoch"] < _SEED_END:  # torch.Generator's range
            raise IncompatibleCheckpointError(
                f"sampler seed {sd['seed']} + epoch {sd['epoch']} is outside a generator's seed range"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved epoch and index, with the saved seed, shuffle and drop_last."""
        self.validate_state_dict(state_dict)
        self.seed, self.shuffle = state_dict["seed"], bool(state_dict["shuffle"])
        self.drop_last = bool(state_dict.get("drop_last", False))
        self.epoch, self.index = state_dict["epoch"], state_dict["index"]
        self._generation += 1
        self._pinned = False
        self._cached = None


class DataPosition:
    """What the training loop consumed; the exact resume point with a prefetching DataLoader.

    Args:
        sampler: the loader's :class:`ResumableSampler`, rewound on load. Without one, the
            position is only counted (``epoch`` via :meth:`set_epoch`), for loops that skip
            ahead themselves.

    Example:
        >>> sampler = ResumableSampler(10, seed=3)
        >>> position = DataPosition(sampler)
        >>> batch = [i for _, i in zip(range(4), sampler)]  # the loader drew 4 ...
        >>> position.advance(2)                              # ... the loop used 2
        >>> sampler.index, position.state_dict()["index"]
        (4, 2)
    """

    def __init__(self, sampler: ResumableSampler | None = None) -> None:
        self.sampler = sampler
        self.epoch = sampler.epoch if sampler is not None else 0
        self.index = sampler.index if sampler is not None else 0

    def advance(self, n: int) -> None:
        """Record that the loop consumed ``n`` more samples (``len(batch)``)."""
        if self.sampler is not None and self.sampler.epoch != self.epoch:
            self.epoch, self.index = self.sampler.epoch, 0  # the loader started the next epoch
        self.index += int(n)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (when there is no sampler to follow); the current epoch is kept."""
        if epoch != self.epoch:
            self.epoch, self.index = int(epoch), 0

    def rewind(self) -> None:
        """Move the sampler back to the consumed position (e.g. after leaving a loop early)."""
        if self.sampler is not None:
            self.sampler.load_state_dict(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state with ``epoch`` and ``index`` set to what was consumed."""
        if self.sampler is None:
            return {"epoch": self.epoch, "index": self.index}
        epoch, index = self.sampler.resume_point(self.epoch, self.index)
        return {**self.sampler.state_dict(), "epoch": epoch, "index": index}

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``state_dict`` can be loaded."""
        if self.sampler is not None:
            self.sampler.validate_state_dict(state_dict)
        elif not isinstance(state_dict, dict) or any(
            type(state_dict.get(k)) is not int for k in ("epoch", "index")
        ):
            raise IncompatibleCheckpointError(
                f"data position needs int 'epoch' and 'index', got {repr(state_dict)[:120]}"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the consumed position and rewind the sampler to it."""
        self.validate_state_dict(state_dict)
        if self.sampler is not None:
            self.sampler.load_state_dict(state_dict)
        self.epoch, self.index = state_dict["epoch"], state_dict["index"]


# --------------------------------------------------------------- a user's own sampler, replayed


def set_epoch_chain(obj: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on ``obj`` and on the samplers it wraps (``.sampler``), as a
    hand-written loop calls ``DistributedSampler.set_epoch`` at the start of every epoch."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        set_epoch = getattr(obj, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        obj = getattr(obj, "sampler", None)


class EpochStreams:
    """The random sources an epoch's order is drawn from, captured and set back together.

    Args:
        generators: the ``torch.Generator`` objects the loader and its sampler draw from
            (``DataLoader(generator=...)``, ``RandomSampler(generator=...)`` ...).
        stateful: a sampler with ``state_dict``/``load_state_dict`` whose own state decides
            its order (or ``None``).

    A snapshot (:meth:`capture`) holds the process's global streams (Python, NumPy, torch
    CPU: a ``RandomSampler`` without a generator seeds itself from torch's, and a
    ``DataLoader`` draws its workers' base seed from it), every generator's state and the
    stateful sampler's state. :meth:`now` is the part the global :class:`RNGState` entry of
    a checkpoint does not already hold.
    """

    def __init__(self, generators: Sequence[torch.Generator] = (), stateful: Any = None) -> None:
        self.generators = list(generators)
        self.stateful = stateful

    def now(self) -> dict[str, Any]:
        """The generators' and the stateful sampler's current state."""
        return {
            "generators": [g.get_state() for g in self.generators],
            "sampler": self.stateful.state_dict() if self.stateful is not None else None,
        }

    def capture(self) -> dict[str, Any]:
        """Everything the next draws depend on: the global streams and :meth:`now`."""
        return {**_global_streams(), **self.now()}

    def set_global(self, snapshot: dict[str, Any]) -> None:
        """Set the process's global streams (only) from a :meth:`capture` snapshot."""
        RNGState().load_state_dict(
            {k: snapshot[k] for k in ("python", "numpy", "torch")} | {"cuda": []}
        )

    def set_now(self, now: dict[str, Any]) -> None:
        """Set the generators and the stateful sampler from :meth:`now` (or a snapshot)."""
        for g, st in zip(self.generators, now["generators"]):
            g.set_state(st.detach().to("cpu", torch.uint8).contiguous())
        if self.stateful is not None and now["sampler"] is not None:
            self.stateful.load_state_dict(now["sampler"])

    def set(self, snapshot: dict[str, Any]) -> None:
        """Set everything back to a :meth:`capture` snapshot."""
        self.set_global(snapshot)
        self.set_now(snapshot)

    def validate(self, value: Any, what: str, *, whole: bool) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``value`` can be set here
        (``whole``: a :meth:`capture` snapshot, else a :meth:`now` part)."""
        keys = {"generators", "sampler"} | ({"python", "numpy", "torch"} if whole else set())
        if not isinstance(value, dict) or set(value) != keys:
            found = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise IncompatibleCheckpointError(
                f"data position: {what} needs keys {sorted(keys)}, got {found}"
            )
        if whole:
            try:
                RNGState().validate_state_dict(
                    {k: value[k] for k in ("python", "numpy", "torch")} | {"cuda": []}
                )
            except IncompatibleCheckpointError as e:
                raise IncompatibleCheckpointError(f"data position: {what}: {e}") from None
        states = value["generators"]
        if not isinstance(states, list) or len(states) != len(self.generators):
            n = len(states) if isinstance(states, list) else type(states).__name__
            raise IncompatibleCheckpointError(
                f"data position: {what} holds {n} generator state(s); this loader draws from "
                f"{len(self.generators)} generator(s)"
            )
        for i, (g, st) in enumerate(zip(self.generators, states)):
            if not isinstance(st, torch.Tensor) or st.dtype != torch.uint8 or st.dim() != 1:
                raise IncompatibleCheckpointError(
                    f"data position: {what} generator {i} is not a uint8 vector"
                )
            try:
                torch.Generator(device=g.device).set_state(st.detach().to("cpu").contiguous())
            except Exception as e:  # noqa: BLE001 - size or content the generator refuses
                raise IncompatibleCheckpointError(
                    f"data position: {what} generator {i} cannot be loaded ({type(e).__name__}: {e})"
                ) from None
        if self.stateful is None:
            if value["sampler"] is not None:
                raise IncompatibleCheckpointError(
                    f"data position: {what} holds a sampler state; this loader's sampler keeps none"
                )
        elif value["sampler"] is None:
            raise IncompatibleCheckpointError(
                f"data position: {what} holds no state for the sampler {type(self.stateful).__name__}"
            )
        else:
            check = getattr(self.stateful, "validate_state_dict", None)
            if callable(check):
                check(value["sampler"])


def _global_streams() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
    }


class ReplaySampler(Sampler[Any]):
    """Yields exactly what a user's (batch) sampler yields, and can re-draw an epoch to resume.

    Args:
        inner: the user's sampler, or the loader's batch sampler (a ``BatchSampler`` over it).
        streams: what ``inner``'s order depends on, captured when an epoch is drawn.
        eager: draw the whole epoch at its start (``list(inner)``). Right for torch's own
            samplers, which draw everything up front anyway; other samplers are iterated
            lazily, as the DataLoader would.

    Before each epoch, :meth:`begin` names the epoch, how many items to skip (the ones a
    resumed run already consumed) and the snapshot to draw from (``None``: the streams as
    they are now). The draw happens when the DataLoader first asks for an index (or at
    :meth:`prime`): ``set_epoch(epoch)`` on the sampler chain, then ``inner`` is iterated.
    ``start`` is the snapshot the epoch was drawn from, for the data position to save.
    """

    def __init__(self, inner: Any, streams: EpochStreams, *, eager: bool) -> None:
        self.inner = inner
        self.streams = streams
        self.eager = eager
        self.epoch = 0
        self.start: dict[str, Any] | None = None
        self.length: int | None = None  # items in the drawn epoch (eager draws only)
        self._skip = 0
        self._replay: dict[str, Any] | None = None
        self._source: Iterator[Any] | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def begin(self, epoch: int, *, skip: int = 0, replay: dict[str, Any] | None = None) -> None:
        """Draw ``epoch`` at the next iteration (from ``replay`` if given) and skip ``skip``."""
        self.epoch, self._skip, self._replay, self._source = int(epoch), int(skip), replay, None
        self.length = None

    def prime(self) -> None:
        """Draw the epoch now (once per :meth:`begin`) and skip what was consumed."""
        if self._source is not None:
            return
        if self._replay is not None:
            self.streams.set(self._replay)
            self.start = self._replay
        else:
            self.start = self.streams.capture()
        set_epoch_chain(self.inner, self.epoch)
        leaf = self.inner
        while type(leaf).__name__ == "BatchSampler" and getattr(leaf, "sampler", None) is not None:
            leaf = leaf.sampler
        name = type(leaf).__name__
        if self.eager:
            order = list(self.inner)
            self.length = len(order)
            if self._skip > len(order):
                raise IncompatibleCheckpointError(
                    f"the checkpoint consumed {self._skip} batches of epoch {self.epoch}, but {name} yields "
                    f"{len(order)} for it: the dataset or the sampler changed since the save"
                )
            self._source = iter(order[self._skip :])
            return
        self._source = skip_consumed(iter(self.inner), self._skip, epoch=self.epoch, what=name)

    def __iter__(self) -> Iterator[Any]:
        return self._run()

    def _run(self) -> Iterator[Any]:
        self.prime()
        assert self._source is not None
        yield from self._source


def skip_consumed(source: Iterator[Any], n: int, *, epoch: int, what: str) -> Iterator[Any]:
    """``source`` past the ``n`` batches a checkpoint says were consumed in ``epoch``;
    IncompatibleCheckpointError if ``what`` (the sampler or loader) yields fewer."""
    for i in range(n):
        if next(source, _END) is _END:
            raise IncompatibleCheckpointError(
                f"the checkpoint consumed {n} batches of epoch {epoch}, but {what} yields {i} for it: "
                "the data or the sampler changed since the save"
            )
    return source


_END = object()
