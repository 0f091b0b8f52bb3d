"""The recovery-strategy interface: given what was lost and what survives, produce the state.

Where it sits: above ``restore`` (which reads and applies one step), below the reader and
the Checkpointer (which describe a loss and run a :class:`~recoverkit.recovery.chain.RecoveryChain`).

A strategy is one way to get a step's state back: from the fastest tier that holds it
(:class:`~recoverkit.recovery.tier_fallback.TierFallback`, today), from a peer's verified
replica, by redistribution from the survivors' snapshots, or by rebuilding a lost pipeline
stage from its neighbours (CheckFree). Each either finds a :class:`Source` of the state and
hands it to the caller's ``use`` (which reads it, verified, and restores it into the caller's
objects all or nothing), returning :class:`Recovered`, or returns :class:`CannotRecover` with
the reason, and the chain tries the next one. A strategy raises only when the caller's
request itself is wrong (the state does not fit its objects): no other strategy would do better.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from ..distributed.transport import PeerTransport
    from ..format.manifest import Manifest
    from ..state.sharded import ShardedTensor
    from ..storage.base import ReadableTier

__all__ = ["CannotRecover", "Loss", "Recovered", "RecoveryStrategy", "Source", "Survivors", "Use"]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Loss:
    """What was lost, and which step is wanted.

    Attributes:
        step: the step wanted; None for the newest step that can be produced.
        ranks: ranks whose processes (and memory) are gone.
        stages: pipeline stages with no surviving copy in any live process.
        tiers: names of tiers that must not be read (lost with a node, or known unreadable).

    Example:
        >>> Loss(step=1200, ranks=frozenset({3}))
        Loss(step=1200, ranks=frozenset({3}), stages=frozenset(), tiers=frozenset())
    """

    step: int | None = None
    ranks: frozenset[int] = frozenset()
    stages: frozenset[int] = frozenset()
    tiers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.step is not None and self.step < 0:
            raise ValueError(f"Loss.step must be >= 0 or None (got {self.step})")
        for name in ("ranks", "stages", "tiers"):  # accept any collection, keep a frozenset
            object.__setattr__(self, name, frozenset(getattr(self, name)))


@dataclass(frozen=True, kw_only=True)
class Survivors:
    """What is still there to recover from.

    Attributes:
        tiers: readable tiers, fastest first (host snapshot, node-local disk, persistent store).
        peers: live ranks that may hold replicas or neighbouring state.
        transport: how to move bytes from those peers (None: peers cannot be asked).
    """

    tiers: Sequence[ReadableTier] = ()
    peers: frozenset[int] = field(default_factory=frozenset)
    transport: PeerTransport | None = None


class Source(Protocol):
    """A step's state that a strategy found: what ``use`` reads (verified) and applies.

    Attributes:
        step: the step this state is.
        manifest: its verified manifest (None when the state was rebuilt, not read).
        tier_name: the tier it comes from (None when not from a tier); retention learns from it.
    """

    @property
    def step(self) -> int: ...

    @property
    def manifest(self) -> Manifest | None: ...

    @property
    def tier_name(self) -> str | None: ...

    def describe(self) -> str:
        """Where the state comes from, for messages and the log."""
        ...

    def read(
        self,
        *,
        rank: int,
        allow_pickle: bool,
        sharded: Mapping[str, ShardedTensor] | None = None,
        entries: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """Rank ``rank``'s state tree (only ``entries`` if given), every byte verified; a damaged
        source raises IntegrityError (or OSError), one that does not fit IncompatibleCheckpointError."""
        ...


#: what the caller does with a source: read it and restore it (or just look at it); raising
#: IntegrityError/OSError means the source is damaged, any other error ends the recovery
Use = Callable[[Source], T]


@dataclass(frozen=True)
class Recovered(Generic[T]):
    """A strategy produced the state: ``value`` is what ``use`` returned for ``source``."""

    strategy: str
    source: Source
    value: T

    @property
    def step(self) -> int:
        return self.source.step


@dataclass(frozen=True)
class CannotRecover:
    """A strategy cannot produce the state; ``reason`` says why, and ``error`` is what the
    caller sees if no later strategy can either (None: a :class:`CheckpointNotFoundError`)."""

    strategy: str
    reason: str
    error: BaseException | None = None


class RecoveryStrategy(ABC):
    """One way of producing a lost state. Implementations are small and stateless between calls.

    Call order: the caller (every rank that lost state, each for itself) builds a :class:`Loss`
    and :class:`Survivors` and runs a chain of strategies; the chain calls :meth:`recover` of
    each in turn until one returns :class:`Recovered`. A strategy that needs other ranks (peer
    replicas, redistribution) documents which ranks call it together.
    """

    #: the name the log and :class:`Recovered` use
    name: str = "strategy"

    @abstractmethod
    def recover(
        self, loss: Loss, survivors: Survivors, use: Use[T]
    ) -> Recovered[T] | CannotRecover:
        """Find the state ``loss`` asks for among ``survivors`` and return ``use(source)``'s
        result as :class:`Recovered`, or :class:`CannotRecover`. ``use`` restores all or
        nothing; a damaged source (``use`` raising IntegrityError/OSError) is skipped in favour
        of another one if the strategy has one."""
