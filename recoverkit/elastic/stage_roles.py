"""Who holds which pipeline stage: at launch, and after a regroup. One collective each.

Where it sits: :class:`~recoverkit.elastic.pipeline.StagePipeline`'s constructor calls
:func:`launch_holders` on every process of the launch world (generation 0): each process
says the stage it takes (``"auto"``: launch ranks 0..S-1 in order, ``"spare"``: none), one
all-gather shares the choices, and every process checks alike that each stage is held by
exactly one process. After a regroup, every member of the new group (a joiner too) calls
:func:`gather_roles` in ``StagePipeline._reassign``: each says the stage it holds, the step
it completed, its joiner scan and the last step's gradient norms, checked as hostile input;
the survivors must agree on the step, and at most one stage may be lost (any number, each
with a free member to take it, when the job keeps stage checkpoints: they roll back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed.regroup import MAX_WORLD, Membership
from ..errors import ConfigError
from .pipeline_options import PipelineRecoveryError

__all__ = ["Roles", "gather_roles", "launch_holders"]


def launch_holders(stage: int | str, membership: Membership, num_stages: int) -> dict[int, int]:
    """Stage -> launch rank, from every member's choice (a collective over the launch world)."""
    me = membership.launch_rank
    if stage == "auto":
        mine = me if me < num_stages else -1
    elif stage == "spare":
        mine = -1
    elif isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage < num_stages:
        mine = stage
    else:
        raise ConfigError(
            f"StagePipeline: stage must be in [0, {num_stages}), 'auto' or 'spare', got {stage!r}"
        )
    if membership.generation != 0:
        raise ConfigError("StagePipeline starts from the launch membership (generation 0)")
    got = [torch.zeros(1, dtype=torch.int64) for _ in membership.members]
    dist.all_gather(got, torch.tensor([mine], dtype=torch.int64))
    holder: dict[int, int] = {}
    for launch, t in zip(membership.members, got):
        role = int(t.item())
        if role in holder:
            raise ConfigError(f"stage {role} is held by launch ranks {holder[role]} and {launch}")
        if role >= 0:
            holder[role] = launch
    missing = [i for i in range(num_stages) if i not in holder]
    if missing:
        raise ConfigError(f"StagePipeline: no process holds stage(s) {missing}")
    return holder


@dataclass(frozen=True)
class Roles:
    """What the members of a new group hold: stage -> launch rank, the step every holder
    completed, a holder's gradient norms of that step, the highest joiner scan."""

    holder: dict[int, int]
    step: int
    norms: tuple[float, ...] | None
    scan_from: int


def gather_roles(
    membership: Membership,
    held: int,
    steps_done: int,
    scan_from: int,
    norms: tuple[float, ...],
    num_stages: int,
    *,
    many: bool = False,
) -> Roles:
    """Every member's stage (``held``, -1: none), completed step, joiner scan and norms (an
    all-gather over the new group), validated; raises PipelineRecoveryError when a row is
    malformed, two members hold a stage, more than one stage (unless ``many``: the job
    rolls back to its stage checkpoints) or more stages than free members are lost, or the
    holders completed different steps."""
    s = num_stages
    members = membership.members
    # float64 holds the integers exactly; the norms of the last step travel to a rebuilder
    mine = torch.tensor(
        [held, steps_done if held >= 0 else -1, scan_from, *norms], dtype=torch.float64
    )
    got = [torch.zeros(3 + s, dtype=torch.float64) for _ in members]
    dist.all_gather(got, mine)
    holder: dict[int, int] = {}
    steps: set[int] = set()
    theirs: tuple[float, ...] | None = None
    for launch, row in zip(members, got):
        values = row.tolist()
        head, tail = values[:3], values[3:]
        ok = all(math.isfinite(v) and v.is_integer() for v in head) and all(
            math.isnan(v) or (math.isfinite(v) and v >= 0) for v in tail
        )
        stage, step, scan = (int(v) if ok else -2 for v in head)
        if not ok or not -1 <= stage < s or stage in holder or not 0 <= scan <= MAX_WORLD:
            raise PipelineRecoveryError(
                f"launch rank {launch} reports {values[:3]} (stage, step, joiner scan) "
                f"and norms {values[3:8]} (held: {sorted(holder.items())})"
            )
        if stage >= 0:
            holder[stage] = launch
            steps.add(step)
            theirs = theirs or tuple(tail)
        scan_from = max(scan_from, scan)
    lost = [i for i in range(s) if i not in holder]
    free = [r for r in members if r not in holder.values()]  # spares and joiners
    if len(lost) > 1 and not many:
        raise PipelineRecoveryError(
            f"stages {lost} were lost at once: one at a time is supported without stage checkpoints"
        )
    if len(lost) > len(free):
        raise PipelineRecoveryError(f"stage(s) {lost} lost and no spare left")
    if len(steps) != 1:
        raise PipelineRecoveryError(f"the survivors completed different steps {sorted(steps)}")
    return Roles(holder, steps.pop(), theirs, scan_from)
