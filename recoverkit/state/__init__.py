"""State capture and apply: the layer between live training objects and checkpoint bytes.

Save: ``capture`` (Stateful objects -> trees) -> ``flatten`` (tensors out, placeholders in)
-> tensors to staging as ``to_bytes_view`` bytes, the skeleton to ``encode`` (typed JSON,
no pickle). Restore: ``decode`` -> the reader's tensors (``from_bytes``) -> ``unflatten`` ->
``apply`` (check everything, then change the live objects). ``RNGState``,
``ResumableSampler`` and ``DataPosition`` are the Stateful pieces a run needs besides its
model and optimizer to resume bit-identically.
"""

from __future__ import annotations

from .codec import decode, encode
from .dtypes import STORABLE_DTYPES, dtype_from_name, dtype_name, from_bytes, nbytes, to_bytes_view
from .flatten import TensorLeaf, TensorRef, flatten, rebuild_container, unflatten
from .rng import RNGState
from .sampler import DataPosition, ResumableSampler
from .stateful import Stateful, apply, capture, check

__all__ = [
    "Stateful",
    "capture",
    "check",
    "apply",
    "TensorLeaf",
    "TensorRef",
    "flatten",
    "unflatten",
    "rebuild_container",
    "encode",
    "decode",
    "dtype_name",
    "dtype_from_name",
    "to_bytes_view",
    "from_bytes",
    "nbytes",
    "STORABLE_DTYPES",
    "RNGState",
    "ResumableSampler",
    "DataPosition",
]
