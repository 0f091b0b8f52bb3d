"""Small agreements between ranks that the staging layer needs, each bounded by a timeout.

* :func:`agree_steps`: which steps every rank holds (the host tier's restorable steps in a
  job of several ranks). A rank that does not answer in time makes the answer empty, so
  restore falls through to the disk tiers instead of hanging.
* :func:`agree_value`: rank 0's decision, on every rank (the tiers a time-based schedule
  makes due: clocks differ between ranks, so rank 0 decides for all).

Every rank calls them in the same order with the same scope; the caller numbers the calls.
"""

from __future__ import annotations

import logging
from typing import Any

from ..distributed.coordinator import Coordinator
from ..errors import CommitTimeoutError

__all__ = ["agree_steps", "agree_value"]

log = logging.getLogger("recoverkit")


def agree_steps(
    coordinator: Coordinator, scope: str, held: list[int], *, timeout_s: float
) -> list[int]:
    """The steps of ``held`` that every rank holds too, ascending (empty if any rank is late)."""
    try:
        gathered = coordinator.gather(f"{scope}/held", {"steps": list(held)}, timeout_s=timeout_s)
        answer: dict[str, Any] | None = None
        if coordinator.rank == 0:
            common = set(held)
            for rep in gathered or []:
                common &= {int(s) for s in rep["steps"]}
            answer = {"steps": sorted(common)}
    except CommitTimeoutError as e:  # rank 0: someone did not answer; tell the others "none"
        log.warning(
            "recoverkit: ranks did not agree on host snapshots in time (%s): restoring from disk", e
        )
        answer = {"steps": []}
    try:
        out = coordinator.broadcast(f"{scope}/common", answer, timeout_s=timeout_s)
    except CommitTimeoutError as e:
        log.warning(
            "recoverkit: no agreement on host snapshots in time (%s): restoring from disk", e
        )
        return []
    finally:
        coordinator.finish(scope, gathers=("held",), broadcasts=("common",))
    return sorted(int(s) for s in out["steps"] if s in held)


def agree_value(
    coordinator: Coordinator, scope: str, value: dict[str, Any], *, timeout_s: float
) -> dict[str, Any]:
    """Rank 0's ``value`` on every rank (raises CommitTimeoutError if it does not come)."""
    try:
        return coordinator.broadcast(
            f"{scope}/value", value if coordinator.rank == 0 else None, timeout_s=timeout_s
        )
    finally:
        coordinator.finish(scope, broadcasts=("value",))
