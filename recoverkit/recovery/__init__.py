"""Recovery strategies: given what was lost and what survives, produce the state or say why not.

``base`` holds the interface (:class:`Loss`, :class:`Survivors`, :class:`Source`,
:class:`RecoveryStrategy`, :class:`Recovered` / :class:`CannotRecover`), ``chain`` runs
strategies in order, and each strategy is one module: ``tier_fallback`` today; peer
replicas, redistribution and CheckFree stage recovery plug in the same way.
"""

from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Source, Survivors, Use
from .chain import RecoveryChain
from .tier_fallback import StepDeletedWarning, TierFallback, TierSource

__all__ = [
    "CannotRecover",
    "Loss",
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
