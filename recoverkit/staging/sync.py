"""Synchronous staging: a planned shard as contiguous CPU bytes, now.

The blocking ``save`` path writes straight from the live tensors: a contiguous CPU tensor
is used in place (no copy); a non-contiguous view or a device tensor is copied once. The
lazy path (``staging.snapshot``) copies into the staging pool instead. The segment writer
packs small shards next to each other, so staging one needs no more than a byte view.
"""

from __future__ import annotations

import torch

from ..state import to_bytes_view
from ..storage.base import ShardData
from .plan import PlannedShard

__all__ = ["stage_now"]

_STRIDED = torch.strided
_UINT8 = torch.uint8


def stage_now(p: PlannedShard) -> ShardData:
    """The shard's bytes as a 1-D uint8 CPU tensor (sharing memory when possible)."""
    src = p.source
    if src.is_cpu and src.layout == _STRIDED and src.is_contiguous() and not src.is_conj() and not src.is_neg():
        # the common case, without to_bytes_view's checks: the planner already refused
        # dtypes that cannot be stored, and a contiguous CPU tensor views as bytes
        flat = src if src.dim() == 1 else src.reshape(-1)
        try:
            data = flat if flat.dtype == _UINT8 else flat.view(_UINT8)
        except RuntimeError:  # pragma: no cover - a dtype without a byte view
            data = to_bytes_view(src)
        return ShardData(p.key, p.dtype, p.global_shape, p.offsets, tuple(src.shape), data)
    if src.device.type != "cpu":
        src = src.to("cpu")
    src = src.resolve_conj().resolve_neg().contiguous()
    return ShardData(p.key, p.dtype, p.global_shape, p.offsets, tuple(src.shape), to_bytes_view(src))
