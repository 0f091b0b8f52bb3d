"""A pipeline job's checkpoints, one run per stage, and the stages' agreement on a step.

Where it sits: beside :class:`~recoverkit.elastic.pipeline.StagePipeline`, which saves its
stage through :class:`StageCheckpoints` (``pipe.save()``) and rolls every stage back to the
newest step all of them committed (``pipe.resume()`` after a restart of the job; in process
when a lost stage cannot be rebuilt, see the pipeline's docstring). Below it: the
:class:`~recoverkit.Checkpointer` (the writer of one stage's run) and the
:class:`~recoverkit.CheckpointReader` (the rollback's reads).

Why one run per stage and not one run per rank: a stage moves between processes (a spare
takes a lost stage over, a replacement joins), so the process that saves stage ``i`` after a
recovery is not the rank that saved it before. Each stage's run lives in ``ROOT/stage-<i>``
and is written by whichever process holds the stage, with its own two-phase commit (one
writer, a :class:`~recoverkit.distributed.coordinator.LocalCoordinator`). A step of the job is
usable when every stage's run committed it; :func:`agree_step` finds the newest such step
over the job's process group (every stage's committed steps, gathered and checked as
hostile input). The runs' retention keeps at least the two newest steps, so a job lost
between two stages' commits of a step still finds the step before in every run.

Limits: steps newer than a rollback stay in the runs until the job saves them again (a
re-save replaces a committed step); a second loss inside the window where some stages
re-saved such a step and others still hold the abandoned one agrees on a mix of the two
(identical when nothing but the rollback happened in between: the replay is deterministic).
A stage's writer is opened by its holder's first save: a holder that froze and was dropped
from the group keeps the run's lock, and the new holder's save raises
CheckpointLockedError naming it. Each stage offers its newest :data:`MAX_OFFERED` steps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..config import CheckpointOptions, TierSpec
from ..errors import ConfigError, IncompatibleCheckpointError, IntegrityError

__all__ = ["StageCheckpoints", "agree_step", "MAX_OFFERED"]

log = logging.getLogger("recoverkit.elastic")

#: the newest committed steps each stage offers to the agreement (fixed size on the wire)
MAX_OFFERED = 16
_MAX_STEP = 2**52
_MAX_STAGES = 2**20


class StageCheckpoints:
    """Every stage's checkpoints under ``root``, one run per stage (``root/stage-<i>``).

    Args:
        root: a directory every process that may hold a stage can reach (a stage taken
            over by another process is read from there).
        options: the runs' options (default: blocking saves to the local tier, the newest
            3 steps kept); retention must keep at least the 2 newest steps.

    A process opens the writer of the stage it holds on its first :meth:`save` of it (a
    spare that took a stage over opens that stage's run; the lost holder's run lock died
    with it). Reads never take a lock.
    """

    def __init__(self, root: str, *, options: CheckpointOptions | None = None) -> None:
        if not isinstance(root, str) or not root:
            raise ConfigError(f"StageCheckpoints needs a root directory, got {root!r}")
        options = options or CheckpointOptions(tiers=[TierSpec.local(every_steps=1)])
        keep = options.retention.keep_last
        if keep is not None and keep < 2:
            raise ConfigError(
                f"StageCheckpoints: retention must keep the 2 newest steps at least (keep_last={keep}): "
                "a job lost between two stages' commits of a step rolls back to the step before"
            )
        self.root, self.options = root, options
        self._writers: dict[int, Any] = {}  # stage -> its run's Checkpointer (this process holds it)

    def path(self, stage: int) -> str:
        """The run of stage ``stage``."""
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < _MAX_STAGES:
            raise ConfigError(f"stage must be an integer in [0, {_MAX_STAGES}), got {stage!r}")
        return os.path.join(self.root, f"stage-{stage}")

    def _writer(self, stage: int) -> Any:
        from ..checkpointer import Checkpointer
        from ..distributed.coordinator import LocalCoordinator

        if stage not in self._writers:
            self._writers[stage] = Checkpointer(
                self.path(stage), options=self.options, coordinator=LocalCoordinator()
            )
        return self._writers[stage]

    def save(self, stage: int, step: int, state: Mapping[str, Any]) -> None:
        """Save ``state`` (the stage's module, optimizer and position) as ``step`` of the
        stage's run; committed when it returns."""
        self._writer(stage).save(step, state)

    def steps(self, stage: int) -> list[int]:
        """The steps the stage's run committed, ascending ([] when it has none)."""
        from ..reading import CheckpointReader

        if stage in self._writers:
            return list(self._writers[stage].steps())
        path = self.path(stage)
        if not os.path.isdir(path):
            return []
        return list(CheckpointReader(path).steps())

    def restore(self, stage: int, step: int, state: MutableMapping[str, Any]) -> int:
        """Load ``step`` of the stage's run into ``state`` (every byte verified first; all or
        nothing). Raises when that step is missing or damaged (no older step is taken: the
        stages agreed on this one)."""
        from ..reading import CheckpointReader

        reader = CheckpointReader(self.path(stage), restore_rng=False)
        got = reader.restore(state, step, strict=False)
        if got.missing_keys:
            raise IncompatibleCheckpointError(
                f"step {step} of stage {stage}'s run ({self.path(stage)}) lacks {list(got.missing_keys)}"
            )
        return int(got)

    def roll_back(
        self,
        stage: int | None,
        num_stages: int,
        state: MutableMapping[str, Any] | None,
        upto: int | None,
        position: Callable[[], int] | None = None,
    ) -> int | None:
        """Collective (:func:`agree_step`; ``stage`` None on a member holding none): the
        newest step every stage's run committed (<= ``upto``), loaded into ``state`` (whose
        restored position, ``position()``, must be that step); None when no step was ever committed by every stage
        (nothing loaded). A step some stage cannot load or check (damaged, or refused as
        another stage's) is given up by every member together and the next older one agreed
        on; when none is left, every member raises IntegrityError (each holds a different
        state then). A run whose steps cannot be listed fails every member alike."""
        held: list[int] | None = None
        if stage is not None:
            try:
                held = self.steps(stage)
            except Exception as e:  # noqa: BLE001 - told to every member through the offer
                log.warning("recoverkit: the steps of stage %d's run cannot be listed: %s", stage, e)
                held = None  # offered as unreadable
        gave_up: list[int] = []
        while True:
            step = agree_step(held, stage=stage, num_stages=num_stages, upto=upto, unreadable=stage is not None and held is None)
            if step is None:
                if gave_up:
                    raise IntegrityError(
                        f"stage checkpoints under {self.root}: step(s) {gave_up} could not be restored on "
                        "every stage and no older step is committed by all"
                    )
                return None
            error: BaseException | None = None
            if stage is not None and state is not None:
                try:
                    self.restore(stage, step, state)
                    if position is not None and position() != step:
                        raise IncompatibleCheckpointError(
                            f"step {step} of stage {stage}'s run holds the position of step {position()}"
                        )
                except Exception as e:  # noqa: BLE001 - told to every member below
                    error = e
            failed = torch.tensor([0 if error is None else 1], dtype=torch.int64)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if not int(failed.item()):
                return step
            log.warning(
                "recoverkit: step %d of the stage checkpoints cannot be restored on every stage%s; "
                "trying an older one", step, "" if error is None else f" (stage {stage}: {error})",
            )  # fmt: skip
            gave_up.append(step)
            upto = step - 1

    def close(self) -> None:
        """Close the runs this process writes."""
        writers, self._writers = list(self._writers.values()), {}
        for w in writers:
            w.close()


def agree_step(
    held: Sequence[int] | None,
    *,
    stage: int | None,
    num_stages: int,
    upto: int | None = None,
    unreadable: bool = False,
) -> int | None:
    """The newest step every stage's run committed (at most ``upto``); None when there is none.

    Collective over the default process group (every member calls it; a member holding no
    stage passes ``stage=None``). Each stage holder offers the newest :data:`MAX_OFFERED`
    steps of ``held`` that are <= ``upto``; what arrives is validated (integers in range,
    each stage offered by exactly one member) before it is used. ``unreadable``: this
    member's run could not be listed; every member then raises IntegrityError naming it.
    """
    top = _MAX_STEP if upto is None else min(upto, _MAX_STEP)
    offered = sorted({s for s in (held or ()) if 0 <= s <= top})[-MAX_OFFERED:]
    mine = torch.full((2 + MAX_OFFERED,), -1.0, dtype=torch.float64)
    mine[0] = -1 if stage is None else stage
    mine[1] = -1 if unreadable else len(offered)
    if offered:
        mine[2 : 2 + len(offered)] = torch.tensor(offered, dtype=torch.float64)
    got = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(got, mine)
    by_stage: dict[int, set[int]] = {}
    for rank, row in enumerate(got):
        values = row.tolist()
        if not all(math.isfinite(v) and v.is_integer() for v in values):
            raise IntegrityError(f"rank {rank} offered malformed steps {values[:4]}")
        who, n = int(values[0]), int(values[1])
        if who == -1:
            continue
        if n == -1 and 0 <= who < num_stages:
            raise IntegrityError(f"rank {rank} cannot list the committed steps of stage {who}'s run")
        steps = [int(v) for v in values[2 : 2 + n]] if 0 <= n <= MAX_OFFERED else None
        if (
            not 0 <= who < num_stages
            or who in by_stage
            or steps is None
            or not all(0 <= s <= top for s in steps)
        ):
            raise IntegrityError(f"rank {rank} offered steps {values[:2 + max(0, min(n, 4))]} (stage, count, steps)")
        by_stage[who] = set(steps)
    missing = [i for i in range(num_stages) if i not in by_stage]
    if missing:
        raise IntegrityError(f"no member offered the steps of stage(s) {missing}")
    common = set.intersection(*by_stage.values())
    return max(common) if common else None
