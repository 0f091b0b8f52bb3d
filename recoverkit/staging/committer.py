"""The one commit path: a step to the tiers a save names, then their retention.

Both saves commit through the Checkpointer's one :class:`Committer`: the blocking ``save``
directly, the ``save_async`` drain from the staged bytes. For each tier, in order: the
two-phase commit of :mod:`recoverkit.distributed.commit`, then retention on the storage
this rank committed to. The committer also remembers, per tier, what this process learned
of the steps' data: the newest step known good (the step just committed, the step a
restore used) and the steps a restore found damaged; retention gets both, so it never
deletes the step a restart would need nor counts a rotten step among the kept ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import CheckpointOptions
from ..distributed.commit import CommitRequest, commit_step
from ..distributed.coordinator import Coordinator
from ..errors import CommitError
from ..format.manifest import TensorRecord
from ..storage.base import RankPayload, Tier
from ..storage.discovery import apply_retention
from ..storage.faults import FaultInjector
from .metrics import SaveMetrics

__all__ = ["CommitReport", "Committer"]


@dataclass
class CommitReport:
    """What one commit over several tiers did (also filled in as it goes, for a failure)."""

    committed_to: list[str] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)


class Committer:
    """Commits steps to tiers and runs their retention; shared by both saves.

    Args:
        coordinator: how ranks agree on each commit.
        run_id: written into every manifest, and keys every exchange.
        options: commit timeout, retention policy and ``allow_pickle``.
        faults: told of the commit phases and of ``retention``.
    """

    def __init__(
        self,
        *,
        coordinator: Coordinator,
        run_id: str,
        options: CheckpointOptions,
        faults: FaultInjector,
    ) -> None:
        self.coordinator = coordinator
        self.rank = coordinator.rank
        self.run_id = run_id
        self.options = options
        self.faults = faults
        self._seq = 0  # saves so far: the same on every rank (commits run in save order)
        self._lock = threading.Lock()
        self._known_lock = threading.Lock()
        self._known_good: dict[str, int] = {}
        self._known_bad: dict[str, set[int]] = {}

    def commit(
        self,
        tiers: Sequence[Tier],
        step: int,
        payload: RankPayload,
        aliases: Mapping[str, TensorRecord],
        user_meta: Mapping[str, Any],
        *,
        metrics: SaveMetrics,
        on_durable: Callable[[str], None] | None = None,
        report: CommitReport | None = None,
    ) -> CommitReport:
        """Commit ``step`` to each of ``tiers`` in order, each followed by its retention.

        ``on_durable(name)`` is told as each tier holds the step; ``metrics`` gets
        ``commit/<tier>``, ``retention/<tier>`` and ``durable_s/<tier>``; ``report`` (returned)
        names the tiers committed and the steps retention deleted, also when a later tier
        fails.

        Raises:
            CommitError: a tier's commit failed, naming the tier; tiers before it keep the
                step, tiers after it are not written.
        """
        report = report if report is not None else CommitReport()
        for tier in tiers:
            t0 = time.perf_counter()
            committed = self._commit(tier, step, payload, aliases, user_meta)
            t1 = time.perf_counter()
            if committed:
                report.deleted.update(self._retain(tier, step))
            metrics.committed(tier.name, commit_s=t1 - t0, retention_s=time.perf_counter() - t1)
            report.committed_to.append(tier.name)
            if on_durable is not None:
                on_durable(tier.name)
        return report

    def _commit(
        self,
        tier: Tier,
        step: int,
        payload: RankPayload,
        aliases: Mapping[str, TensorRecord],
        user_meta: Mapping[str, Any],
    ) -> bool:
        """True where this rank committed the step to storage of its own (rank 0, adopters)."""
        with self._lock:
            request = CommitRequest(
                step, self.run_id, payload, aliases, self.options.allow_pickle, user_meta, self._seq
            )
            self._seq += 1
            try:
                manifest = commit_step(
                    tier,
                    self.coordinator,
                    request,
                    faults=self.faults,
                    timeout_s=self.options.commit_timeout_s,
                )
            except CommitError as e:
                raise CommitError(
                    f"saving step {step} to {tier.describe(step)} failed",
                    step=step,
                    failures=e.failures,
                ) from (e.__cause__ or e)
            return manifest is not None

    def _retain(self, tier: Tier, step: int) -> list[int]:
        """Retention on the storage this rank committed to: the step just committed is known
        good, and so is the newest step a restore used; damaged steps are known bad."""
        good, bad = self.learn(tier.name, good=step)
        self.faults.reached("retention", step=step, rank=self.rank)
        return apply_retention(tier, self.options.retention, good=good, bad=bad)

    def learn(
        self, tier: str, *, good: int | None = None, bad: int | None = None
    ) -> tuple[set[int], set[int]]:
        """Record what was learned of ``tier``'s data; return its (known good, known bad) steps."""
        with self._known_lock:
            damaged = self._known_bad.setdefault(tier, set())
            if good is not None:  # committed anew, or read back whole: whatever it was before
                damaged.discard(good)
                self._known_good[tier] = max(good, self._known_good.get(tier, good))
            if bad is not None:
                damaged.add(bad)
                if self._known_good.get(tier) == bad:
                    del self._known_good[tier]
            newest = self._known_good.get(tier)
            return ({newest} if newest is not None else set()), set(damaged)
