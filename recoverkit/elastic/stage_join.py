"""A replacement for a lost pipeline stage, started after the loss: admitted in process.

Where it sits: :class:`~recoverkit.elastic.pipeline.StagePipeline` calls
:func:`await_replacement` during a recovery when a stage was lost and no spare is left
(``PipelineOptions.replacement_timeout_s > 0``). The replacement is a process the user (or a
supervisor) starts once the loss is seen, outside torchrun's rendezvous: a new torchrun agent
would make torchrun restart every worker, rolling every stage back (:mod:`.admit`'s module
doc). It joins through the job's store with :func:`~recoverkit.elastic.admit.join` and builds
its ``StagePipeline(..., stage="joiner")``, which takes the lost stage and rebuilds it like a
spare does (the next stage's replica, else CheckFree).

The survivors' side, after they re-formed without the lost stage::

    until replacement_timeout_s:
      read_proposal          an admission already proposed for this generation (first wins)
      else pending           joiners announced (hostile records refused), from scan_from on
           propose           the first ``needed`` of them; every survivor reads the one agreed
    admit                    the joiners that acknowledge; the new default group formed
      FormationFailed        the joiner died on the way: re-form from the old members
                             (regroup) and wait again, within the same deadline

Every survivor runs this alone between collectives; the store's first-writer-wins on the
proposal is the agreement, as at an elastic trainer's step boundary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ..distributed.regroup import Heartbeat, Membership, regroup
from .admit import FormationFailed, Proposal, admit, pending, propose, read_proposal
from .pipeline_options import PipelineRecoveryError

__all__ = ["Replacement", "await_replacement"]

log = logging.getLogger("recoverkit.elastic")

_POLL_S = 0.05


@dataclass(frozen=True)
class Replacement:
    """The membership with the joiners admitted, the launch rank to scan from next time,
    and the joiners admitted and refused on the way."""

    membership: Membership
    scan_from: int
    joined: tuple[int, ...]
    refused: tuple[int, ...]


def await_replacement(
    store: Any,
    membership: Membership,
    *,
    needed: int,
    scan_from: int,
    timeout_s: float,
    form_timeout_s: float,
    pg_timeout_s: float,
    regroup_timeout_s: float,
    heartbeat: Heartbeat | None,
) -> Replacement:
    """Wait (bounded) for ``needed`` joiners and admit them into the survivors' group.

    Args:
        store: the job's store.
        membership: the survivors' current membership (its default group formed).
        needed: joiners wanted (the stages lost and not covered by a spare).
        scan_from: the first launch rank not yet looked at (joiners get fresh ones).
        timeout_s: how long to wait for a joiner that acknowledges and forms the group.
        form_timeout_s / pg_timeout_s: the admission's bounds (:func:`~.admit.admit`).
        regroup_timeout_s: bound on re-forming from the old members after a failed admission.
        heartbeat: the survivors' heartbeat (switched to each new generation).

    Raises:
        PipelineRecoveryError: no joiner was admitted within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    first_seen: dict[int, float] = {}
    refused: list[int] = []
    while True:
        proposal = read_proposal(store, membership)
        if proposal is None:
            valid, nxt, bad = pending(store, membership, scan_from, first_seen, patience_s=2.0)
            if bad:
                log.warning("pipeline: joiner launch rank(s) %s refused (malformed, missing or withdrawn)", bad)
                refused.extend(bad)
            if valid:
                chosen = tuple(valid[:needed])
                proposal = propose(
                    store, membership, Proposal(at=0, joiners=chosen, next=chosen[-1] + 1)
                )
            else:
                scan_from = nxt
        if proposal is not None:
            scan_from = max(scan_from, proposal.next)
            try:
                adm = admit(
                    store,
                    membership,
                    proposal,
                    form_timeout_s=form_timeout_s,
                    pg_timeout_s=pg_timeout_s,
                    heartbeat=heartbeat,
                )
            except FormationFailed as e:  # the joiner died on the way: the old members again
                log.warning("pipeline: admitting launch rank(s) %s failed: %s", list(proposal.joiners), e)
                refused.extend(proposal.joiners)
                membership = regroup(
                    store,
                    e.fallback,
                    timeout_s=regroup_timeout_s,
                    heartbeat=heartbeat,
                    pg_timeout_s=pg_timeout_s,
                )
                continue
            refused.extend(adm.dropped)
            membership = adm.membership
            if adm.joined:
                log.warning("pipeline: launch rank(s) %s admitted to replace lost stage(s)", list(adm.joined))
                return Replacement(membership, scan_from, adm.joined, tuple(refused))
        if time.monotonic() >= deadline:
            raise PipelineRecoveryError(
                f"no replacement joined within {timeout_s} s (joiners refused: {refused[:16]})"
            )
        time.sleep(_POLL_S)

