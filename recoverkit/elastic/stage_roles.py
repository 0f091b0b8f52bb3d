"""Who holds which pipeline stage at launch: every process's choice, agreed by one collective.

Where it sits: :class:`~recoverkit.elastic.pipeline.StagePipeline`'s constructor calls
:func:`launch_holders` on every process of the launch world (generation 0); a recovery's
reassignment is the pipeline's own (``StagePipeline._reassign``), a joiner's is
:mod:`.stage_join`'s. Each process says the stage it takes (``"auto"``: launch ranks
0..S-1 in order, ``"spare"``: none), one all-gather shares the choices, and every process
checks alike that each stage is held by exactly one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.regroup import Membership
from ..errors import ConfigError

__all__ = ["launch_holders"]


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
