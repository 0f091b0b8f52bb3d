"""CheckFree+'s swapped order on torch.distributed.pipelining: odd micro-batches run the first
two stages' blocks, and the last two stages', in each other's slot.

Where it sits: :class:`~recoverkit.elastic.pipeline.StagePipeline` with
``CheckFreeOptions(plus=True)`` runs each step as two schedules over the same modules (so
the same gradients): the even micro-batches through the stages in order (``ScheduleGPipe``),
the odd ones through a second pipeline of ``S + 2`` virtual stages built here::

    embedding(0) -> blocks(1) -> blocks(0) -> blocks(2) ... blocks(S-3) -> blocks(S-1) -> blocks(S-2) -> head(S-1)

One schedule over the stages cannot express it: a ``PipelineStage`` sends to the next stage
index on one stage-to-rank map for every micro-batch, and a swapped micro-batch visits the
first stage's process twice (embedding, then the partner's blocks, then its own).

The embedding still runs first and the head last; the first stage's process computes two
virtual stages (the embedding and its own blocks), and so does the last stage's (its blocks
and the head). One ``PipelineStage`` per virtual stage, each over a part of the stage's own
module (its parameters, so gradients accumulate where the ordered schedule's do), scheduled by
torch's schedule runtime from a compute-only GPipe order (forwards in path order, backwards
in reverse) whose sends and receives torch adds itself. Every process computes a virtual
stage's place in the path from the stage split it is given, so all agree without talking.

The runtime (``_PipelineScheduleRuntime`` and ``_Action``) is private in torch 2.13: a torch
without it raises ConfigError naming it when CheckFree+ is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["Split", "swap_path", "build_swapped"]

#: a stage module -> (its embedding or None, its blocks, its head or None), sharing parameters
Split = Callable[
    [torch.nn.Module], tuple[torch.nn.Module | None, torch.nn.Module, torch.nn.Module | None]
]


def swap_path(num_stages: int) -> list[tuple[str, int]]:
    """The odd micro-batches' virtual stages: (part, owning stage), in execution order.

    Example:
        >>> swap_path(4)
        [('embed', 0), ('blocks', 1), ('blocks', 0), ('blocks', 3), ('blocks', 2), ('head', 3)]
    """
    s = num_stages
    if s < 4:
        raise ConfigError(f"CheckFree+ swaps two pairs of stages: it needs >= 4 stages, got {s}")
    middle = [("blocks", j) for j in range(2, s - 2)]
    return [
        ("embed", 0),
        ("blocks", 1),
        ("blocks", 0),
        *middle,
        ("blocks", s - 1),
        ("blocks", s - 2),
        ("head", s - 1),
    ]


def build_swapped(
    *,
    module: torch.nn.Module,
    stage: int,
    num_stages: int,
    split: Split,
    group: Any,
    group_rank_of_stage: dict[int, int],
    n_microbatches: int,
    loss_fn: Callable[..., torch.Tensor],
) -> Any:
    """The schedule of the odd micro-batches for the process holding ``stage``.

    ``group_rank_of_stage``: stage -> rank in ``group`` of its process (every stage's).
    """
    try:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (
            FORWARD,
            FULL_BACKWARD,
            _Action,
            _PipelineScheduleRuntime,
        )
    except ImportError as e:  # pragma: no cover - depends on the torch release
        raise ConfigError(f"CheckFree+'s swap needs torch's pipeline schedule runtime: {e}") from e
    path = swap_path(num_stages)
    embed, blocks, head = split(module)
    parts = {"embed": embed, "blocks": blocks, "head": head}
    mine = [i for i, (_, owner) in enumerate(path) if owner == stage]
    stages = []
    for i in mine:
        part = parts[path[i][0]]
        if part is None:
            raise ConfigError(f"stage {stage}'s split gave no {path[i][0]} (CheckFree+ needs it)")
        stages.append(PipelineStage(part, i, len(path), torch.device("cpu"), group=group))
    actions: dict[int, list[Any]] = {}
    for s in range(num_stages):
        own = [i for i, (_, owner) in enumerate(path) if owner == s]
        fwd = [_Action(i, FORWARD, m) for i in own for m in range(n_microbatches)]
        bwd = [_Action(i, FULL_BACKWARD, m) for i in reversed(own) for m in range(n_microbatches)]
        actions[group_rank_of_stage[s]] = fwd + bwd
    schedule = _PipelineScheduleRuntime(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    schedule._prepare_schedule_with_comms(actions)
    return schedule
