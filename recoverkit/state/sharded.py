"""How a rank's tensors relate to the world: rank-local, replicated, or a shard.

* **Sharded**: a :class:`ShardedTensor` (explicit shard metadata: the local tensor, the
  global shape and this rank's offsets, as ZeRO-style flat partitions have) or a DTensor
  (``state.dtensor``). Saved under its global key with its offsets; restored into any
  other sharding.
* **Replicated**: every tensor of an entry that is the same on every rank (a DDP module,
  an optimizer over only DDP parameters, or an entry wrapped in :func:`replicated`).
  Written once, by one owner rank; owners are spread over the ranks by bytes.
* **Rank-local**: everything else in a world of more than one rank (RNG states, a
  per-rank sampler). Stored under ``rank-RRRRR/`` so every rank gets its own back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ShardedTensor", "Replicated", "replicated", "unwrap", "is_replicated_entry", "assign_owners", "local_prefix"]


@dataclass
class ShardedTensor:
    """A rank's shard of a global tensor, with explicit placement.

    Example:
        >>> full = torch.arange(10.0)
        >>> shard = ShardedTensor(full[4:8].clone(), global_shape=(10,), offsets=(4,))
        >>> shard.local.shape
        torch.Size([4])
    """

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    write: bool = True
    """False on ranks that hold a replica of a region another rank writes (e.g. HSDP)."""

    def __post_init__(self) -> None:
        self.global_shape = tuple(int(d) for d in self.global_shape)
        self.offsets = tuple(int(o) for o in self.offsets)
        if len(self.global_shape) != self.local.dim() or len(self.offsets) != self.local.dim():
            raise ValueError(
                f"shard of rank {self.local.dim()} needs global_shape and offsets of that rank, got "
                f"{self.global_shape} and {self.offsets}"
            )
        for d, (o, n, g) in enumerate(zip(self.offsets, self.local.shape, self.global_shape)):
            if o < 0 or o + n > g:
                raise ValueError(f"dim {d}: shard [{o}, {o + n}) does not fit global extent {g}")

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - handled by the planner
        raise TypeError("ShardedTensor is saved by recoverkit's planner, not through state_dict")


@dataclass
class Replicated:
    """Marks a state entry as identical on every rank (written once)."""

    obj: Any


def replicated(obj: Any) -> Replicated:
    """Declare that ``obj`` (a module, an optimizer, …) holds the same state on every rank."""
    return Replicated(obj)


def unwrap(obj: Any) -> Any:
    """The object whose state is saved: without Replicated and DDP wrappers."""
    if isinstance(obj, Replicated):
        obj = obj.obj
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(obj, DistributedDataParallel):
        obj = obj.module
    return obj


def is_replicated_entry(obj: Any, ddp_params: set[int]) -> bool:
    """Whether an entry is the same on every rank (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(obj, (Replicated, DistributedDataParallel)):
        return True
    if isinstance(obj, torch.optim.Optimizer) and ddp_params:
        params = [id(p) for g in obj.param_groups for p in g["params"]]
        return bool(params) and all(p in ddp_params for p in params)
    return False


def ddp_param_ids(entries: Sequence[Any]) -> set[int]:
    from torch.nn.parallel import DistributedDataParallel

    ids: set[int] = set()
    for e in entries:
        inner = e.obj if isinstance(e, Replicated) else e
        if isinstance(inner, (DistributedDataParallel, torch.nn.Module)) and isinstance(e, (Replicated, DistributedDataParallel)):
            ids.update(id(p) for p in inner.parameters())
    return ids


def assign_owners(sizes: Sequence[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Spread replicated tensors over ranks by bytes (largest first, to the least loaded).

    Deterministic: every rank computes the same assignment from the same keys and sizes.

    Example:
        >>> assign_owners([("a", 10), ("b", 6), ("c", 5)], 2)
        {'a': 0, 'b': 1, 'c': 1}
    """
    load = [0] * world_size
    owners: dict[str, int] = {}
    for key, n in sorted(sizes, key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owners[key] = r
        load[r] += n
    return owners


def local_prefix(rank: int) -> str:
    """Namespace of rank-local tensor keys in a multi-rank checkpoint."""
    return f"rank-{rank:05d}"
