"""A replacement for a lost pipeline stage, started after the loss: admitted in process.

Where it sits: :class:`~recoverkit.elastic.pipeline.StagePipeline` calls
:func:`await_replacement` during a recovery when a stage was lost and no spare is left
(``PipelineOptions.replacement_timeout_s > 0``). The replacement is a process the user (or a
supervisor) starts once the loss is seen, outside torchrun's rendezvous: a new torchrun agent
would make torchrun restart every worker, rolling every stage back (:mod:`.admit`'s module
doc). It joins through the job's store with :func:`~recoverkit.elastic.admit.join` and builds
its ``StagePipeline(..., stage="joiner")``, which takes the lost stage and rebuilds it like a
spare does (the next stage's replica, else CheckFree).

The survivors' side, after they re-formed without the lost stage, one round per generation
(a round's decision is one store key, first writer wins, so every survivor acts alike)::

    decision of this round   <ns>/g<G+1>/pipeline/replacement: joiners to admit, or "none"
      absent: pending        joiners announced (hostile records refused), from scan_from on
              some: decide   the first ``needed`` of them
              none, and this survivor's deadline passed: decide "none"
    "none"                   every survivor raises PipelineRecoveryError, together
    joiners: admit           the ones that acknowledge; the new default group formed
      nobody acknowledged    the same members in the next generation: the next round
      FormationFailed        the joiner died on the way: re-form from the old members
                             (regroup), the next round

Giving up is decided like admitting, so no survivor gives up while another admits a joiner.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..distributed.regroup import MAX_VALUE_BYTES, MAX_WORLD, Heartbeat, Membership, regroup
from ..distributed.store_io import _store_call
from .admit import MAX_JOINERS, FormationFailed, Proposal, admit, pending
from .pipeline_options import PipelineRecoveryError

__all__ = ["Replacement", "await_replacement"]

log = logging.getLogger("recoverkit.elastic")

_POLL_S = 0.05


@dataclass(frozen=True)
class Replacement:
    """The membership with the joiners admitted, and the launch rank to scan from next time."""

    membership: Membership
    scan_from: int


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
    if isinstance(needed, bool) or not isinstance(needed, int) or not 1 <= needed <= MAX_JOINERS:
        raise ValueError(f"await_replacement: needed must be in [1, {MAX_JOINERS}], got {needed!r}")
    deadline = time.monotonic() + timeout_s
    first_seen: dict[int, float] = {}
    refused: list[int] = []
    while True:
        key = f"{membership.namespace}/g{membership.generation + 1}/pipeline/replacement"
        decision = _decision(store, key, membership)
        if decision is None:
            valid, nxt, bad = pending(store, membership, scan_from, first_seen, patience_s=2.0)
            if bad:
                log.warning("pipeline: joiner launch rank(s) %s refused (malformed, missing or withdrawn)", bad)
                refused.extend(bad)
            scan_from = nxt
            if valid:
                chosen = valid[:needed]
                doc = json.dumps({"joiners": chosen, "next": chosen[-1] + 1})
            elif time.monotonic() >= deadline:
                doc = "none"
            else:
                time.sleep(_POLL_S)
                continue
            _store_call("decide the replacement", store.compare_set, key, "", doc)
            decision = _decision(store, key, membership)
        if not isinstance(decision, Proposal):  # "none": every survivor gives up together
            raise PipelineRecoveryError(
                f"no replacement joined within {timeout_s} s (joiners refused: {refused[:16]})"
            )
        scan_from = max(scan_from, decision.next)
        try:
            adm = admit(
                store,
                membership,
                decision,
                form_timeout_s=form_timeout_s,
                pg_timeout_s=pg_timeout_s,
                heartbeat=heartbeat,
            )
        except FormationFailed as e:  # the joiner died on the way: the old members again
            log.warning("pipeline: admitting launch rank(s) %s failed: %s", list(decision.joiners), e)
            refused.extend(decision.joiners)
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
            return Replacement(membership, scan_from)


def _decision(store: Any, key: str, membership: Membership) -> Proposal | str | None:
    """This round's decision: None (none yet), ``"none"`` (give up) or the joiners to admit
    (hostile input: size, JSON, and ranks checked before use)."""
    if not _store_call("check the replacement decision", store.check, [key]):
        return None
    raw = _store_call("read the replacement decision", store.get, key)
    if raw == b"none":
        return "none"
    try:
        if not isinstance(raw, bytes) or len(raw) > MAX_VALUE_BYTES:
            raise ValueError("too large")
        doc = json.loads(raw.decode("ascii"))
        joiners, nxt = doc["joiners"], doc["next"]
        ok = (
            set(doc) == {"joiners", "next"}
            and isinstance(joiners, list)
            and 1 <= len(joiners) <= MAX_JOINERS
            and all(type(r) is int and 0 <= r < MAX_WORLD for r in joiners)
            and joiners == sorted(set(joiners))
            and not set(joiners) & set(membership.members)
            and type(nxt) is int
            and joiners[-1] < nxt <= MAX_WORLD
        )
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise PipelineRecoveryError(f"{key}: not a replacement decision ({str(raw)[:80]})")
    return Proposal(at=0, joiners=tuple(joiners), next=nxt)
