"""The elastic trainer's options: how gradients are reduced and how long every wait may take.

Where it sits: passed to :class:`~recoverkit.elastic.trainer.ElasticTrainer`; validated
here, once, so a bad value is named before the first step instead of at the first failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["ElasticOptions", "ReduceMode", "REDUCE_MODES"]

ReduceMode = Literal["global", "ordered", "shrink"]
REDUCE_MODES: tuple[str, ...] = ("global", "ordered", "shrink")


@dataclass(frozen=True, kw_only=True)
class ElasticOptions:
    """How an :class:`~recoverkit.elastic.trainer.ElasticTrainer` reduces and recovers.

    Attributes:
        mode: ``"global"``: each rank's loss is divided by the step's global sample count
            and the gradients are summed over the live ranks (one all-reduce): the global
            batch and the gradient scale survive a lost rank, equal to the failure-free run
            to rounding. ``"ordered"``: the same, reduced by
            :class:`~recoverkit.distributed.global_grad.OrderedGradSum` (every micro-batch's
            gradient summed in global index order): bit-identical at every world size, at
            the cost of an all-gather of every micro-batch's gradient. ``"shrink"``: what
            TorchFT does, for comparison: every rank keeps its share of the world as
            launched, a lost rank's share is dropped, each rank normalizes by its own
            samples and the gradients are averaged over the live ranks.
        regroup_timeout_s: bound on one re-forming of the group (:func:`regroup`).
        join_window_s: without a heartbeat, how long a survivor waits for late members.
        pg_timeout_s: the collective timeout of every re-formed group, so also the bound on
            detecting a peer that hangs without closing its sockets (the launch group's
            timeout is the caller's ``init_process_group(timeout=...)``).
        collective_timeout_s: bound on each wait of the gradient reduction (``None``: the
            group's timeout). A wait past it is given up as a loss: the group is re-formed
            (with the same members if none is dead) and the step redone.
        poll_s: how often a pending collective of the reduction asks the heartbeat whether
            a member died (a survivor whose collective never talks to the dead rank is woken
            this way, not by a reset), in every mode. A DDP model's reduction in the
            backward pass asks it only through its hook's ``SumHookState(abort=...)``.
        max_recoveries_per_step: re-formings one step may go through before the trainer
            gives up with the last failure (a failure that a new group does not cure).
        sync_max_bytes: the most bytes of model + optimizer state a rank accepts from a
            peer when survivors disagree on the last completed step, or a newcomer from the
            survivors (``None``: eight times this rank's own parameters and buffers, plus 1 MiB).
        admit_timeout_s: admitting joiners (:mod:`~recoverkit.elastic.admit`): how long the
            members wait for the joiners' acknowledgements and for the new group's
            rendezvous (a joiner that died meanwhile costs at most this, then it is dropped),
            and how long a launch rank taken without its record is waited for.

    Example:
        >>> ElasticOptions(mode="ordered", collective_timeout_s=5.0).mode
        'ordered'
        >>> ElasticOptions(mode="mean")
        Traceback (most recent call last):
        ...
        recoverkit.errors.ConfigError: ElasticOptions.mode must be one of ['global', 'ordered', 'shrink'], got 'mean'
    """

    mode: ReduceMode = "global"
    regroup_timeout_s: float = 60.0
    join_window_s: float = 2.0
    pg_timeout_s: float = 30.0
    collective_timeout_s: float | None = None
    poll_s: float = 0.05
    max_recoveries_per_step: int = 3
    sync_max_bytes: int | None = None
    admit_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in REDUCE_MODES:
            raise ConfigError(f"ElasticOptions.mode must be one of {list(REDUCE_MODES)}, got {self.mode!r}")
        for name in ("regroup_timeout_s", "join_window_s", "pg_timeout_s", "poll_s", "admit_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                raise ConfigError(f"ElasticOptions.{name} must be a number of seconds in (0, 1e6), got {value!r}")
        if self.join_window_s > self.regroup_timeout_s:
            raise ConfigError(
                f"ElasticOptions: join_window_s ({self.join_window_s}) exceeds regroup_timeout_s "
                f"({self.regroup_timeout_s})"
            )
        c = self.collective_timeout_s
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1e6):
            raise ConfigError(f"ElasticOptions.collective_timeout_s must be None or seconds in (0, 1e6), got {c!r}")
        m = self.max_recoveries_per_step
        if type(m) is not int or not 1 <= m <= 1000:
            raise ConfigError(f"ElasticOptions.max_recoveries_per_step must be an int in 1..1000, got {m!r}")
        b = self.sync_max_bytes
        if b is not None and (type(b) is not int or b < 1):
            raise ConfigError(f"ElasticOptions.sync_max_bytes must be None or a positive int, got {b!r}")
