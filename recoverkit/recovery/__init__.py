"""Recovery strategies: given what was lost and what survives, produce the state or say why not.

``base`` holds the interface (:class:`Loss`, :class:`Survivors`, :class:`Source`,
:class:`RecoveryStrategy`, :class:`Recovered` / :class:`CannotRecover`), ``chain`` runs
strategies in order, and each strategy is one module: ``tier_fallback`` (the disk tiers,
newest valid step, fastest first) and ``memory`` (collective: the newest step complete in
shared memory across ranks, own snapshots and peer replicas, fetched over the peer
transport where a node lacks a copy, every region verified before anything is applied;
``memory_source`` holds the tier its bytes are read through); ``checkfree``
(CheckFree / CheckFree+: a lost pipeline stage rebuilt from its neighbours, the last
resort of a chain) plugs in the same way.
"""

from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Source, Survivors, Use
from .chain import RecoveryChain
from .checkfree import CheckFreeOptions, CheckFreeRecovery, average_neighbours
from .memory import MemoryRestore, MemorySkippedWarning
from .tier_fallback import StepDeletedWarning, TierFallback, TierSource

__all__ = [
    "CannotRecover",
    "CheckFreeOptions",
    "CheckFreeRecovery",
    "average_neighbours",
    "Loss",
    "MemoryRestore",
    "MemorySkippedWarning",
    "Recovered",
    "RecoveryChain",
    "RecoveryStrategy",
    "Source",
    "StepDeletedWarning",
    "Survivors",
    "TierFallback",
    "TierSource",
    "Use",
]
