"""The options and records of a :class:`~recoverkit.elastic.pipeline.StagePipeline`.

Where it sits: passed to and returned by :mod:`.pipeline`; validated here, once, so a bad
value is named before the first step rather than at the first failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError, IncompatibleCheckpointError, RecoverkitError
from ..recovery.checkfree import CheckFreeOptions

__all__ = [
    "POSITION_KEYS",
    "PipelineOptions",
    "PipelineRecoveryError",
    "RollbackNeeded",
    "StageRecovery",
    "StepRecord",
    "apply_lr_schedule",
    "schedule_factor",
    "validate_position",
]

POSITION_KEYS = ("stage", "num_stages", "steps_done", "norms")
_MAX_STEPS = 1 << 62


class PipelineRecoveryError(RecoverkitError, RuntimeError):
    """The pipeline cannot recover in process (too many stages lost, survivors at different
    steps, or no spare left); the caller falls back to restarting the job from a checkpoint."""


class RollbackNeeded(PipelineRecoveryError):
    """Every strategy refused to rebuild the lost stage and the job keeps stage checkpoints:
    every member rolls back to the newest step every stage committed, in process."""


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """How a :class:`StagePipeline` runs and recovers.

    Attributes:
        num_stages: stages of the pipeline (launch ranks 0..num_stages-1 hold them; the
            launch ranks above are spares).
        n_microbatches: micro-batches per step.
        schedule: ``"gpipe"`` or ``"1f1b"`` (PyTorch's ScheduleGPipe / Schedule1F1B).
        checkfree: the rule's options (per-stage clipping bound, weights, learning-rate scale;
            ``distill_steps`` > 0: every stage keeps its module's inputs and outputs of the
            last committed step, and a rebuilt interior stage is fitted to its neighbours'
            copies of the lost stage's pairs).
        replicate: each step, send every stage's model and optimizer to the next stage's
            process: a lost stage then comes back exactly (CheckFree only if that copy is
            gone too). Costs one state-sized transfer per stage per step.
        pg_timeout_s: the stages' group timeout: bound on every pipeline wait (a frozen peer).
        regroup_timeout_s: bound on re-forming the group.
        transfer_timeout_s: bound on each recovery transfer.
        max_recoveries_per_step: recoveries one step may go through before giving up.
        extras_every: with ``checkfree.plus``: every this many steps, the first stage's
            embedding and the last stage's head (the keys a stage holds and its swap partner
            does not) are copied to the partner's process, so a lost edge stage can be rebuilt.
        replacement_timeout_s: when a stage is lost and no spare is left, how long the
            survivors wait for a replacement process started after the loss (it joins with
            :func:`~recoverkit.elastic.admit.join` and builds ``StagePipeline(...,
            stage="joiner")``); 0: spares only, the recovery fails at once.
        admit_timeout_s: bound on admitting a joiner (its acknowledgement, the new group).
        lr_schedule: ``lr_schedule(step)`` -> the factor on each parameter group's base
            learning rate at that step (LambdaLR's convention; the base is the group's
            ``initial_lr``, its rate when the optimizer was built). It runs on the pipeline's
            global step, so a stage rebuilt by CheckFree continues the schedule at the step it
            resumes, its base ``lr_scale`` times the others' (no warm-up restart). ``None``:
            the optimizers' own rates, unchanged. Use this rather than a torch scheduler over
            ``make_optimizer``'s optimizer: a rebuilt stage gets a new optimizer.
    """

    num_stages: int
    n_microbatches: int
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    checkfree: CheckFreeOptions = field(default_factory=CheckFreeOptions)
    replicate: bool = False
    pg_timeout_s: float = 30.0
    regroup_timeout_s: float = 60.0
    transfer_timeout_s: float = 60.0
    max_recoveries_per_step: int = 2
    extras_every: int = 1
    lr_schedule: Callable[[int], float] | None = None
    replacement_timeout_s: float = 0.0
    admit_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.lr_schedule is not None and not callable(self.lr_schedule):
            raise ConfigError(
                f"PipelineOptions.lr_schedule must be a function of the step, got {self.lr_schedule!r}"
            )
        if not isinstance(self.num_stages, int) or self.num_stages < 2:
            raise ConfigError(f"PipelineOptions.num_stages must be >= 2, got {self.num_stages!r}")
        if not isinstance(self.n_microbatches, int) or self.n_microbatches < 1:
            raise ConfigError(
                f"PipelineOptions.n_microbatches must be >= 1, got {self.n_microbatches!r}"
            )
        if not isinstance(self.extras_every, int) or self.extras_every < 1:
            raise ConfigError(
                f"PipelineOptions.extras_every must be >= 1, got {self.extras_every!r}"
            )
        if self.checkfree.plus and (self.num_stages < 4 or self.n_microbatches % 2):
            raise ConfigError(
                "PipelineOptions: CheckFree+ needs >= 4 stages and an even n_microbatches "
                f"(got {self.num_stages} and {self.n_microbatches})"
            )
        if self.schedule not in ("gpipe", "1f1b"):
            raise ConfigError(
                f"PipelineOptions.schedule must be 'gpipe' or '1f1b', got {self.schedule!r}"
            )
        per_schedule = self.n_microbatches // (2 if self.checkfree.plus else 1)
        if self.schedule == "1f1b" and per_schedule < self.num_stages:
            raise ConfigError(
                f"PipelineOptions: Schedule1F1B needs at least num_stages ({self.num_stages}) "
                f"micro-batches per schedule, got {per_schedule}"
                + (
                    " (CheckFree+ runs half of them in each of its two)"
                    if self.checkfree.plus
                    else ""
                )
            )
        v = self.replacement_timeout_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
            raise ConfigError(
                f"PipelineOptions.replacement_timeout_s must be seconds in [0, 1e6), got {v!r}"
            )
        for name in ("pg_timeout_s", "regroup_timeout_s", "transfer_timeout_s", "admit_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6:
                raise ConfigError(f"PipelineOptions.{name} must be seconds in (0, 1e6), got {v!r}")


@dataclass(frozen=True)
class StepRecord:
    """One completed step: its index, the last stage's mean loss (None elsewhere), this
    stage's clipped gradient norm and every stage's, and its seconds."""

    step: int
    loss: float | None
    norm: float
    norms: tuple[float, ...]
    seconds: float


@dataclass(frozen=True)
class StageRecovery:
    """One recovery as this process saw it (times are ``time.time()`` / seconds).
    ``rolled_back_to``: the step every stage went back to when the lost stage could not be
    rebuilt (strategy ``checkpoint rollback``), else None."""

    step: int
    lost_stages: tuple[int, ...]
    replaced_by: dict[int, int]
    detected_at: float
    detected_by: str
    regroup_s: float
    rebuild_s: float
    total_s: float
    strategy: str | None
    source: str | None
    served: tuple[str, ...]
    rolled_back_to: int | None = None


def validate_position(state: Any, stage: int, num_stages: int) -> tuple[int, tuple[float, ...]]:
    """A saved pipeline position (``StagePipeline.state_dict``), read back as hostile input:
    its keys and types, the stage and stage count this process has, a step in range, one
    norm per stage (finite >= 0, or NaN before the first step). Returns (steps_done, norms);
    raises :class:`IncompatibleCheckpointError` naming what is wrong."""
    if not isinstance(state, dict) or set(state) != set(POSITION_KEYS):
        got = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise IncompatibleCheckpointError(f"pipeline position needs keys {list(POSITION_KEYS)}, got {got}")
    for key, want in (("stage", stage), ("num_stages", num_stages)):
        v = state[key]
        if type(v) is not int or v != want:
            raise IncompatibleCheckpointError(
                f"pipeline position: saved {key} {str(v)[:40]}, this process has {want} "
                "(a checkpoint of another stage or pipeline)"
            )
    steps = state["steps_done"]
    if type(steps) is not int or not 0 <= steps < _MAX_STEPS:
        raise IncompatibleCheckpointError(
            f"pipeline position: steps_done must be an int in [0, 2**62), got {str(steps)[:40]}"
        )
    norms = state["norms"]
    if (
        not isinstance(norms, list)
        or len(norms) != num_stages
        or any(
            isinstance(n, bool)
            or not isinstance(n, float)
            or not (math.isnan(n) or (math.isfinite(n) and n >= 0))
            for n in norms
        )
    ):
        raise IncompatibleCheckpointError(
            f"pipeline position: norms must be {num_stages} floats (finite >= 0, or NaN), "
            f"got {str(norms)[:80]}"
        )
    return steps, tuple(norms)


def apply_lr_schedule(optimizer: Any, schedule: Callable[[int], float], k: int) -> None:
    """Step ``k``'s learning rates: each group's base (``initial_lr``, set from its rate the
    first time) times ``schedule(k)``; a factor that is not a finite number >= 0 is a
    ConfigError (raised before the step's first collective, so alike on every stage).

    The bases: ``make_optimizer`` gives each stage its optimizer and base rate; a stage
    rebuilt by CheckFree gets a fresh optimizer, its base ``lr_scale`` times that one's; an
    exact copy keeps the base the stage had (the replica carries it). The factor is of the
    global step, so a rebuilt stage continues the schedule where the others are."""
    factor = schedule_factor(schedule, k)
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def schedule_factor(schedule: Callable[[int], float], k: int) -> float:
    """``schedule(k)``, checked: a finite number >= 0 (else ConfigError)."""
    factor = schedule(k)
    if (
        isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or not (math.isfinite(factor) and factor >= 0)
    ):
        raise ConfigError(
            f"PipelineOptions.lr_schedule({k}) returned {factor!r}: a finite number >= 0 is needed"
        )
    return float(factor)
