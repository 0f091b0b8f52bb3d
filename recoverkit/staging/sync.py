"""Synchronous staging: a planned shard as contiguous CPU bytes, now.

The blocking ``save`` path writes straight from the live tensors: a contiguous CPU tensor
is used in place (no copy); a non-contiguous view or a device tensor is copied once. The
lazy path (``staging.lazy``) copies into the staging pool instead.
"""

from __future__ import annotations

from ..state import to_bytes_view
from ..storage.base import ShardData
from .plan import PlannedShard

__all__ = ["stage_now"]


def stage_now(p: PlannedShard) -> ShardData:
    """The shard's bytes as a 1-D uint8 CPU tensor (sharing memory when possible)."""
    src = p.source
    if src.device.type != "cpu":
        src = src.to("cpu")
    src = src.resolve_conj().resolve_neg().contiguous()
    return ShardData(p.key, p.dtype, p.global_shape, p.offsets, tuple(src.shape), to_bytes_view(src))
