"""Apply a verified, fully read state tree to the live objects.

Runs only after every byte was read and verified (``restore.reader``). Restore is all or
nothing (invariant 6), so everything that can fail is checked before the first live
object changes: the saved random streams (``RNGState.validate_state_dict``: types, dtypes,
sizes, CUDA devices), every ShardedTensor region against its target, then ``state.check``
(modules, optimizers and schedulers by a dry run, tensors, sampler and data position).
Only then are the objects loaded, the ShardedTensor regions copied into the targets'
local tensors, plain values replaced, and the random streams restored last.

A tree read in place (``restore.in_place``) first has its PendingTensors resolved: those
that fit their live target put the target itself in the tree (the checks see it, the loads
find nothing to copy) and their verified bytes are copied into it once every check passed,
right before the first load; the others become new tensors, as a copy read gives them.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from ..errors import IncompatibleCheckpointError
from ..staging.plan import RNG_KEY
from ..state import RNGState, apply, capture, rebuild_container
from ..state.dtensor import as_sharded, is_dtensor, local_of
from ..state.sharded import ShardedTensor, unwrap
from .in_place import copy_all, resolve

__all__ = ["apply_restored", "target_shards"]


def target_shards(state: MutableMapping[str, Any]) -> dict[str, ShardedTensor]:
    """Every ShardedTensor the targets hold, under the key the save planner gives it."""
    found: dict[str, ShardedTensor] = {}
    for name, obj in state.items():
        _walk(capture({name: unwrap(obj)})[name], name, found)
    return found


def _walk(tree: Any, path: str, found: dict[str, ShardedTensor]) -> None:
    if is_dtensor(tree):
        found[path] = as_sharded(tree)
    elif isinstance(tree, ShardedTensor):
        found[path] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _walk(v, f"{path}/{k}", found)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _walk(v, f"{path}/{i}", found)


def apply_restored(state: MutableMapping[str, Any], captured: dict[str, Any], *, restore_rng: bool) -> None:
    """Load ``captured`` into ``state``; every check happens before the first change.

    ``captured`` may come from a read in place (it may hold PendingTensors): their bytes land
    in the live tensors that fit them, after every check (see the module docstring).

    Raises:
        IncompatibleCheckpointError: something does not fit (or is damaged beyond what
            the checksums can see); no live object was changed.
    """
    targets = {k: unwrap(v) for k, v in state.items()}
    in_place = resolve(targets, captured)  # none left pending; the fitting targets stand in
    rng = captured.pop(RNG_KEY, None)
    if rng is not None and restore_rng:
        RNGState().validate_state_dict(rng)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    captured = {k: _swap_shards(_target_tree(state, k), v, copies) for k, v in captured.items()}
    # state.check first: nothing changes unless everything fits; then the bytes land in place
    apply(targets, captured, before_load=lambda: copy_all(in_place))
    for dst, src in copies:
        dst.copy_(src)
    for k, v in targets.items():  # plain values were replaced in `targets`
        if not hasattr(state[k], "load_state_dict") and not isinstance(state[k], ShardedTensor):
            state[k] = v
    if rng is not None and restore_rng:
        RNGState().load_state_dict(rng)


def _target_tree(state: MutableMapping[str, Any], name: str) -> Any:
    """The live tree of entry ``name``: its state dict (DTensors and all), or its value."""
    if name not in state:
        return None
    return capture({name: unwrap(state[name])})[name]


def _swap_shards(target: Any, restored: Any, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Put the target's own ShardedTensor in the tree and note the copy to make later."""
    if isinstance(restored, ShardedTensor):
        if is_dtensor(target):
            local = local_of(target)
        elif isinstance(target, ShardedTensor):
            local = target.local
        else:
            return restored
        if local.shape != restored.local.shape or local.dtype != restored.local.dtype:
            raise IncompatibleCheckpointError(
                f"saved shard {list(restored.local.shape)} {restored.local.dtype} does not fit the target "
                f"{list(local.shape)} {local.dtype}"
            )
        copies.append((local, restored.local))
        return target
    if isinstance(target, dict) and isinstance(restored, dict):  # keeps OrderedDict + _metadata
        return rebuild_container(restored, [(k, _swap_shards(target.get(k), v, copies)) for k, v in restored.items()])
    return restored
