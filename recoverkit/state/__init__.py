"""State capture and apply: the layer between live training objects and checkpoint bytes.

Save: ``capture`` (Stateful objects -> trees) -> ``flatten`` (tensors out, placeholders in)
-> tensors to staging as ``to_bytes_view`` bytes, the skeleton to ``encode`` (typed JSON,
no pickle). Restore: ``decode`` -> the reader's tensors (``from_bytes``) -> ``unflatten`` ->
``apply`` (check everything, then change the live objects). ``RNGState``,
``ResumableSampler`` and ``DataPosition`` are the Stateful pieces a run needs besides its
model and optimizer to resume bit-identically; ``GlobalBatchSampler`` and ``keyed_rng`` make
a step compute the same numbers at any world size (global batches and random streams keyed
to the logical micro-batch, not to the rank).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .codec import decode, encode
    from .dtypes import (
        STORABLE_DTYPES,
        dtype_from_name,
        dtype_name,
        from_bytes,
        nbytes,
        to_bytes_view,
    )
    from .flatten import TensorRef, rebuild_container, unflatten
    from .global_batch import (
        GlobalBatchLoader,
        GlobalBatchSampler,
        MicroBatch,
        RankBatchSampler,
        StepBatch,
    )
    from .keyed_rng import keyed_generator, keyed_rng, keyed_seed
    from .leaf import TensorLeaf
    from .rng import RNGState
    from .sampler import DataPosition, ResumableSampler
    from .stateful import Stateful, apply, capture, check

#: where each public name lives: imported on first use, so ``recoverkit.state.leaf`` or
#: ``recoverkit.state.codec`` load without the torch-side modules. The function ``flatten``
#: is not among them: ``recoverkit.state.flatten`` is its module, and importing that module
#: (``from .flatten import ...`` anywhere) makes the package attribute the module whatever
#: was cached before; call ``recoverkit.state.flatten.flatten``
_WHERE = {
    "decode": ".codec", "encode": ".codec",
    "STORABLE_DTYPES": ".dtypes", "dtype_from_name": ".dtypes", "dtype_name": ".dtypes",
    "from_bytes": ".dtypes", "nbytes": ".dtypes", "to_bytes_view": ".dtypes",
    "TensorRef": ".flatten", "rebuild_container": ".flatten", "unflatten": ".flatten",
    "TensorLeaf": ".leaf",
    "GlobalBatchSampler": ".global_batch", "GlobalBatchLoader": ".global_batch", "MicroBatch": ".global_batch",
    "RankBatchSampler": ".global_batch", "StepBatch": ".global_batch",
    "keyed_seed": ".keyed_rng", "keyed_generator": ".keyed_rng", "keyed_rng": ".keyed_rng",
    "RNGState": ".rng",
    "DataPosition": ".sampler", "ResumableSampler": ".sampler",
    "Stateful": ".stateful", "apply": ".stateful", "capture": ".stateful", "check": ".stateful",
}  # fmt: skip

__all__ = [
    "Stateful",
    "capture",
    "check",
    "apply",
    "TensorLeaf",
    "TensorRef",
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
    "GlobalBatchSampler",
    "GlobalBatchLoader",
    "MicroBatch",
    "StepBatch",
    "RankBatchSampler",
    "keyed_seed",
    "keyed_generator",
    "keyed_rng",
]


__getattr__, __dir__ = lazy_names(globals(), _WHERE)
