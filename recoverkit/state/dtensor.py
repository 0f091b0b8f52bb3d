"""DTensor (FSDP2, tensor parallel) as recoverkit shards.

A DTensor in a state dict is saved as a :class:`~recoverkit.state.sharded.ShardedTensor`
view of its local tensor, at the global offsets its placements give it, and restored by
copying the saved region into its local tensor — so a DTensor checkpoint reshards into any
other mesh, into plain tensors, or into explicit shards, and back.

* ``Shard(d)`` placements (even or uneven, as FSDP2 makes them) give the global offsets.
* ``Replicate()`` mesh dimensions hold the same region on several ranks: only the rank at
  coordinate 0 of every replicated dimension writes it (HSDP writes each shard once).
* ``Partial()`` values are not a tensor yet (they need a reduction): saving one is an error.

Example (on every rank of an FSDP2 job)::

    ckpt.save(step, {"model": fsdp_model, "optim": optimizer})
    ckpt.restore({"model": fsdp_model, "optim": optimizer})
"""

from __future__ import annotations

from typing import Any

import torch

from .sharded import ShardedTensor

__all__ = ["is_dtensor", "local_of", "as_sharded", "prepare_optimizer_state"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(obj: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(obj, cls)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns the bytes: a DTensor's local shard, else ``t`` itself."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()  # type: ignore[attr-defined]  # a DTensor (checked above)
    return t


def as_sharded(dt: Any) -> ShardedTensor:
    """This rank's shard of ``dt`` with its global placement.

    Raises:
        ValueError: ``dt`` has a ``Partial`` placement (reduce it before saving).
    """
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = dt.device_mesh, dt.placements
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(
            f"a DTensor of shape {list(dt.shape)} has a Partial placement {placements}: it holds "
            "unreduced partial values, not a tensor; reduce it (redistribute to Replicate/Shard) before saving"
        )
    local = local_of(dt)
    shape, offsets = compute_local_shape_and_global_offset(dt.shape, mesh, placements)
    if tuple(shape) != tuple(local.shape):
        raise ValueError(f"DTensor local shard {list(local.shape)} does not match its placement's {list(shape)}")
    coord = mesh.get_coordinate() or [0] * mesh.ndim
    writer = all(c == 0 for c, p in zip(coord, placements) if isinstance(p, Replicate))
    return ShardedTensor(local, tuple(dt.shape), tuple(offsets), write=writer)


def prepare_optimizer_state(opt: torch.optim.Optimizer) -> bool:
    """Give a fresh optimizer over DTensor parameters its state tensors, so a restore can fill
    them in place with the right placements. Returns whether it did.

    An optimizer creates its state lazily on the first step; a restore into plain tensors
    would then hand it tensors of the wrong kind. Uses torch's own initialiser (a step with
    zero gradients and learning rate 0, which changes no parameter).
    """
    if opt.state or not any(is_dtensor(p) for g in opt.param_groups for p in g["params"]):
        return False
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(opt)
    return True
