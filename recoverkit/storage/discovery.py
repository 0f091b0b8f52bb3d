"""Discovery and retention over any tier.

Discovery walks committed steps newest first and yields the first one whose manifest
verifies (self-checksum, format version, every listed file present at its recorded size).
A step that fails is skipped with a warning naming the fault. The full data checksum pass
happens while restoring (every byte read is verified); a step that fails there is skipped
the same way by the restorer.

Retention deletes committed steps the policy no longer keeps; the newest committed step is
never deleted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

from ..config import RetentionPolicy
from ..errors import IncompatibleCheckpointError, IntegrityError
from ..format.manifest import Manifest
from .base import ReadableTier, Tier

__all__ = ["CheckpointSkippedWarning", "candidates", "newest_valid", "apply_retention"]


class CheckpointSkippedWarning(UserWarning):
    """A committed-looking step was skipped because it is damaged or foreign."""


def candidates(tier: ReadableTier, *, step: int | None = None) -> Iterator[tuple[int, Manifest]]:
    """Yield ``(step, manifest)`` for steps whose manifest verifies, newest first.

    With ``step`` given, only that step is considered and its fault is raised, not skipped.
    """
    if step is not None:
        yield step, tier.manifest(step)
        return
    for s in reversed(tier.steps()):
        try:
            manifest = tier.manifest(s)
        except (IntegrityError, IncompatibleCheckpointError, OSError) as e:
            warnings.warn(
                f"skipping {tier.describe(s)}: {e}", CheckpointSkippedWarning, stacklevel=3
            )
            continue
        yield s, manifest


def newest_valid(tier: ReadableTier) -> int | None:
    """The newest step whose manifest and files verify, or None."""
    for s, _ in candidates(tier):
        return s
    return None


def apply_retention(tier: Tier, policy: RetentionPolicy) -> list[int]:
    """Delete the committed steps ``policy`` does not keep; return them (ascending).

    The newest committed step is always kept, and so is the newest step that verifies (if a
    newer one is damaged, the older one is what a restart would use).
    """
    steps = tier.steps()
    protected = newest_valid(tier)
    doomed = [
        s
        for i, s in enumerate(reversed(steps))
        if s != protected and not policy.keeps(step=s, rank_from_newest=i)
    ]
    for s in sorted(doomed):
        tier.delete(s)
    return sorted(doomed)
