"""Retention over any tier, and the warning every skipped step raises.

Discovery (walking committed steps newest first, fastest tier first, skipping a step whose
manifest or data fails with a :class:`CheckpointSkippedWarning`) has one implementation:
:class:`recoverkit.reading.CheckpointReader`, which the Checkpointer's ``steps``/``latest``/
``restore`` and the CLI's read-only commands all go through.

Retention deletes committed steps the policy no longer keeps. A manifest that verifies says
nothing about the data (bit rot leaves it intact), so retention does not judge steps
itself: its caller passes what it *knows*. The rule, shared by the trainer's retention and
``recoverkit gc``:

* steps known **good** (the step just committed; the step a restore actually used; a step
  that passed a full CRC pass) are never deleted;
* steps known **bad** (a restore or a CRC pass found their data damaged) are not counted
  among the newest ``keep_last`` and are never protected; they are kept as evidence unless
  the caller asks for them to go (``gc --delete-damaged``);
* of the other steps, the newest is always kept and the policy decides the rest.

This module knows nothing of who learned what: the Checkpointer and ``gc`` inject it. Both
decide with :func:`decide_retention` and delete with :func:`delete_decided`; ``gc`` adds only
its CRC pass (how it learns) and its printing, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from ..config import RetentionPolicy

if TYPE_CHECKING:  # the CLI imports this module and starts without torch, which base imports
    from .base import Tier

__all__ = [
    "CheckpointSkippedWarning",
    "RetentionDecision",
    "Known",
    "decide_retention",
    "delete_decided",
    "apply_retention",
]


class CheckpointSkippedWarning(UserWarning):
    """A committed-looking step was skipped because it is damaged or foreign."""


#: What a caller knows of some steps' data: the steps, or each step with how it was learned
#: (``{120: "passed a full CRC pass"}``); the words become part of the decision's reason.
Known: TypeAlias = "Iterable[int] | Mapping[int, str]"


@dataclass(frozen=True)
class RetentionDecision:
    """What retention does with one step, and why."""

    step: int
    keep: bool
    reason: str
    #: the step is known bad (its data failed a checksum)
    damaged: bool = False


def _how(known: Known) -> dict[int, str]:
    if isinstance(known, Mapping):
        return {int(s): str(how) for s, how in known.items()}
    return {int(s): "" for s in known}


def decide_retention(
    steps: Sequence[int],
    policy: RetentionPolicy,
    *,
    good: Known = (),
    bad: Known = (),
    delete_bad: bool = False,
) -> list[RetentionDecision]:
    """Decide every step of ``steps`` (committed steps, any order), newest first.

    Args:
        steps: the committed steps of one tier.
        policy: the retention rule for the counted steps.
        good: steps whose data is known good; never deleted (a step also in ``bad`` is not).
            A mapping also says how each was learned, for the reason.
        bad: steps whose data is known damaged; not counted among the last ``keep_last``,
            never protected, kept unless ``delete_bad``. A mapping also says what was found.
        delete_bad: delete the known-bad steps too.

    Example:
        >>> [d.step for d in decide_retention([100, 200, 300], RetentionPolicy(keep_last=1),
        ...                                   good=[100], bad=[200, 300]) if not d.keep]
        []
        >>> [d.step for d in decide_retention([100, 150, 200, 300], RetentionPolicy(keep_last=1),
        ...                                   good=[150], bad=[200, 300], delete_bad=True) if not d.keep]
        [300, 200, 100]
        >>> decide_retention([1, 2], RetentionPolicy(keep_last=1), bad={2: "crc32c mismatch"})[0].reason
        'DAMAGED, not counted among the last 1, kept as evidence: crc32c mismatch'
    """
    bad_how = _how(bad)
    good_how = {s: how for s, how in _how(good).items() if s not in bad_how}
    keep_last = policy.keep_last
    among = "the kept" if keep_last is None else f"the last {keep_last}"
    out = []
    counted = 0
    for s in sorted(set(steps), reverse=True):
        if s in bad_how:
            why = f"DAMAGED, not counted among {among}, " + (
                "deleted" if delete_bad else "kept as evidence"
            )
            out.append(
                RetentionDecision(
                    s, not delete_bad, why + (f": {bad_how[s]}" if bad_how[s] else ""), True
                )
            )
            continue
        i, counted = counted, counted + 1
        if s in good_how:
            keep, why = True, f"{good_how[s] or 'data known good'} (never deleted)"
        elif i == 0:
            keep, why = True, "newest step not known bad (never deleted)"
        elif policy.keeps(step=s, rank_from_newest=i):
            keep = True
            if keep_last is None:
                why = "keep_last=None keeps every step"
            else:
                why = (
                    f"among the last {keep_last}"
                    if i < keep_last
                    else f"a multiple of {policy.keep_every}"
                )
        else:
            keep = False
            why = f"older than the last {keep_last}" + (
                f", not a multiple of {policy.keep_every}" if policy.keep_every else ""
            )
        out.append(RetentionDecision(s, keep, why))
    return out


def delete_decided(tier: Tier, decisions: Iterable[RetentionDecision]) -> list[int]:
    """Delete the steps ``decisions`` do not keep, oldest first; return them (ascending).

    Oldest first, so a deleter that dies half-way has removed the oldest of them only. The
    caller holds the root's lock (DESIGN invariant 10).
    """
    doomed = sorted(d.step for d in decisions if not d.keep)
    for s in doomed:
        tier.delete(s)
    return doomed


def apply_retention(
    tier: Tier,
    policy: RetentionPolicy,
    *,
    good: Known = (),
    bad: Known = (),
    delete_bad: bool = False,
) -> list[int]:
    """Delete the committed steps ``policy`` does not keep; return them (ascending).

    ``good`` and ``bad`` are what the caller knows of the steps' data (see the module
    docstring): the Checkpointer passes the step it just committed and the step its restore
    used as good, and the steps its restore found damaged as bad. Known-good steps are never
    deleted; known-bad ones are neither counted nor deleted (unless ``delete_bad``); the
    newest other step is always kept. ``recoverkit gc`` is this with its CRC pass as the
    source of what is known.

    Example:
        >>> import tempfile
        >>> from recoverkit.storage.local import LocalTier
        >>> apply_retention(LocalTier(tempfile.mkdtemp()), RetentionPolicy(keep_last=1), good=[7])
        []
    """
    return delete_decided(
        tier, decide_retention(tier.steps(), policy, good=good, bad=bad, delete_bad=delete_bad)
    )
