"""Run recovery strategies in order until one produces the state, and log which one did."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..errors import CheckpointNotFoundError, add_note
from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use

__all__ = ["RecoveryChain"]

log = logging.getLogger("recoverkit.recovery")


class RecoveryChain:
    """Strategies tried in order (exact ones first, approximate ones such as CheckFree last).

    Example:
        >>> import tempfile, torch, recoverkit
        >>> from recoverkit.recovery import Loss, RecoveryChain, Survivors, TierFallback
        >>> from recoverkit.storage.local import LocalTier
        >>> root = tempfile.mkdtemp()
        >>> with recoverkit.Checkpointer(root) as ckpt:
        ...     _ = ckpt.save(7, {"w": torch.ones(2)})
        >>> chain = RecoveryChain([TierFallback()])
        >>> got = chain.run(Loss(), Survivors(tiers=[LocalTier(root)]), lambda source: source.step)
        >>> got.strategy, got.value
        ('tier fallback', 7)
    """

    def __init__(self, strategies: Sequence[RecoveryStrategy]) -> None:
        if not strategies:
            raise ValueError("a RecoveryChain needs at least one strategy")
        self.strategies = list(strategies)

    def run(self, loss: Loss, survivors: Survivors, use: Use[T]) -> Recovered[T]:
        """The first strategy's :class:`Recovered`; raises when none can: the error of the last
        strategy that gave one (the others' reasons as notes), else CheckpointNotFoundError."""
        refusals: list[CannotRecover] = []
        for strategy in self.strategies:
            outcome = strategy.recover(loss, survivors, use)
            if isinstance(outcome, Recovered):
                tried = "".join(f"; {c.strategy} could not: {c.reason}" for c in refusals)
                log.info(
                    "recovered step %d with %s from %s%s",
                    outcome.step,
                    outcome.strategy,
                    outcome.source.describe(),
                    tried,
                )
                return outcome
            log.info("%s cannot recover %s: %s", outcome.strategy, _wanted(loss), outcome.reason)
            refusals.append(outcome)
        errors = [c.error for c in refusals if c.error is not None]
        error = (
            errors[-1]
            if errors
            else CheckpointNotFoundError(
                f"no strategy could recover {_wanted(loss)}: "
                + "; ".join(f"{c.strategy}: {c.reason}" for c in refusals)
            )
        )
        if len(refusals) > 1:
            for c in refusals:
                add_note(error, f"{c.strategy} could not recover {_wanted(loss)}: {c.reason}")
        raise error


def _wanted(loss: Loss) -> str:
    return "the newest step" if loss.step is None else f"step {loss.step}"
