"""Tier fallback: the newest valid step from the fastest surviving tier that holds it.

The recovery strategy every job has: candidate steps newest first, and within a step the
tiers fastest first (host snapshot -> node-local disk -> persistent store). A manifest or data
that fails verification is skipped with a warning (and reported as known bad); a step deleted
meanwhile by a live writer's retention restarts the walk from the newest step. It reads only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.manifest import Manifest
from ..restore.reader import read_state
from ..storage.base import ReadableTier
from ..storage.discovery import CheckpointSkippedWarning
from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use

if TYPE_CHECKING:  # a type only: the CLI's read commands must not import torch
    from ..state.sharded import ShardedTensor

__all__ = ["MAX_RESCANS", "StepDeletedWarning", "TierFallback", "TierSource"]

MAX_RESCANS = 64  # how often one walk may start over because a writer deleted what it read


class StepDeletedWarning(CheckpointSkippedWarning):
    """The step being read was deleted meanwhile (a live writer's retention); retried."""


@dataclass(frozen=True)
class TierSource:
    """A committed step on a tier, its manifest verified (a :class:`~recoverkit.recovery.base.Source`)."""

    tier: ReadableTier
    step: int
    manifest: Manifest

    @property
    def tier_name(self) -> str:
        return self.tier.name

    def describe(self) -> str:
        return self.tier.describe(self.step)

    def read(
        self,
        *,
        rank: int,
        allow_pickle: bool,
        sharded: Mapping[str, ShardedTensor] | None = None,
        entries: Collection[str] | None = None,
    ) -> dict[str, Any]:
        state: dict[str, Any] = read_state(
            self.tier,
            self.step,
            self.manifest,
            rank=rank,
            allow_pickle=allow_pickle,
            sharded=sharded,
            entries=entries,
        )
        return state


class TierFallback(RecoveryStrategy):
    """The newest valid step (or ``loss.step``) over ``survivors.tiers`` minus ``loss.tiers``.

    Args:
        label: names the checkpoint in the errors (default: the first tier's description).
        learn: told ``learn(tier_name, bad=step)`` of each step found damaged.

    A step asked for by number that is damaged gives its fault as the error; no valid step at
    all gives CheckpointNotFoundError. Lost ranks and stages do not matter here: a committed
    step on a tier holds every rank's state.
    """

    name = "tier fallback"

    def __init__(
        self, *, label: str | None = None, learn: Callable[..., Any] | None = None
    ) -> None:
        self.label = label
        self._learn = learn or (lambda *_, **__: None)

    def recover(
        self, loss: Loss, survivors: Survivors, use: Use[T]
    ) -> Recovered[T] | CannotRecover:
        tiers = [t for t in survivors.tiers if t.name not in loss.tiers]
        label = self.label or (tiers[0].describe(0) if tiers else "no tier")
        step = loss.step
        skip: set[tuple[int, int]] = set()
        faults: list[BaseException] = []
        for _ in range(MAX_RESCANS):
            rescan = False
            for s, i in _held(tiers, step):
                tier, manifest = tiers[i], None
                if (s, i) in skip:
                    continue
                try:
                    manifest = tier.manifest(s)
                    source = TierSource(tier, s, manifest)
                    return Recovered(self.name, source, use(source))
                except (IntegrityError, OSError, ValueError) as e:
                    if manifest is not None and not isinstance(e, (IntegrityError, OSError)):
                        raise  # read fine but does not fit (IncompatibleCheckpointError): not a fault
                    if _gone(tier, s, e):
                        rescan = True
                        break
                    warnings.warn(
                        f"skipping {tier.describe(s)}: {e}", CheckpointSkippedWarning, stacklevel=4
                    )
                    faults.append(e)
                    skip.add((s, i))
                    if isinstance(e, IntegrityError):  # damaged data (an OSError may pass)
                        self._learn(tier.name, bad=s)
            if not rescan:
                break
        else:
            why = f"steps were deleted faster than read ({MAX_RESCANS} tries)"
            return CannotRecover(self.name, why, CheckpointNotFoundError(f"{label}: {why}"))
        if step is not None and faults:
            return CannotRecover(
                self.name, f"step {step} is damaged on every tier holding it", faults[-1]
            )
        detail = f" ({'; '.join(map(str, faults))})" if faults else ""
        why = f"no valid {'checkpoint' if step is None else f'step {step}'}{detail}"
        return CannotRecover(self.name, why, CheckpointNotFoundError(f"{label}: {why}"))


def _held(tiers: Sequence[ReadableTier], step: int | None) -> list[tuple[int, int]]:
    """(step, tier index) newest step first, fastest tier first within a step."""
    held = {(s, i) for i, t in enumerate(tiers) for s in t.steps() if step is None or s == step}
    return sorted(held, key=lambda x: (-x[0], x[1]))


def _gone(tier: ReadableTier, step: int, error: BaseException) -> bool:
    """Whether ``step`` failed because it was deleted meanwhile (warned), not damaged."""
    try:
        gone = step not in tier.steps()
    except OSError:  # the root itself is gone
        gone = True
    if gone:
        warnings.warn(
            f"{tier.describe(step)} was deleted while it was read (a writer's retention?): "
            f"starting over from the newest step ({type(error).__name__}: {error})",
            StepDeletedWarning,
            stacklevel=5,
        )
    return gone
