"""The zarr v3 layout of a persistent-tier step: array names, dtypes and chunk grids.

A step in the persistent tier is a zarr v3 group; every logical tensor is one array at its
*global* shape under the ``tensors`` sub-group::

    step-000001200/zarr.json                      group (attributes: recoverkit step)
    step-000001200/tensors/zarr.json              group holding every array
    step-000001200/tensors/<array name>/zarr.json one array per state key
    step-000001200/tensors/<array name>/c/0/0     chunks (bytes [+ zstd|blosc] + crc32c)

This module is pure layout: names, dtypes, chunk grids and the array metadata JSON. It does
no I/O (``storage/zarr_store.py`` does), so the format is testable on its own.

**Dtypes.** Every array is readable by plain zarr-python 3. Dtypes it has no zarr data type
for (``bfloat16``, every ``float8_*``, ``complex32``, the sub-byte and ``bits*`` kinds) are
stored as the unsigned integer of the same width; the logical dtype is in the array's
attributes under ``recoverkit.dtype`` (``a.view(torch.bfloat16)`` gets the values back).

**Chunks.** The chunk grid is aligned to the writers' shards: along each dimension the
chunk extent divides every interior shard boundary, so each rank's region covers whole
chunks and no two ranks ever write the same chunk. Chunks larger than ``max_chunk_bytes``
are split further (still aligned). Where alignment would give absurdly small chunks (shard
boundaries with a tiny common divisor), the chunk is grown to at least ``min_chunk_bytes``;
chunks on a boundary are then shared, which stays correct on kvstores with atomic
conditional writes (tensorstore's ``file`` driver locks every key) but costs a
read-modify-write.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleCheckpointError
from ..state.dtypes import dtype_from_name

__all__ = [
    "ARRAYS_GROUP",
    "ShardRegion",
    "ArrayLayout",
    "NATIVE_DTYPES",
    "storage_dtype",
    "chunk_shape_for",
    "array_layout",
    "array_name",
    "array_path",
    "group_metadata",
]

#: The sub-group of a step that holds every array.
ARRAYS_GROUP = "tensors"
#: Chunks above this size are split further (keeps encode memory and read granularity sane).
MAX_CHUNK_BYTES = 64 << 20
#: Aligned chunks below this size are grown (unaligned) unless they already hold the array.
MIN_CHUNK_BYTES = 64 << 10
#: zarr v3 data types plain zarr-python reads natively; anything else is stored as uintN.
NATIVE_DTYPES = frozenset(
    {
        "bool",
        "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
        "complex64", "complex128",
    }
)  # fmt: skip
_SAFE = re.compile(r"[A-Za-z0-9._-]")
_MAX_NAME = 180  # bytes; file systems allow 255 per path component
_ATTR = "recoverkit"


@dataclass(frozen=True)
class ShardRegion:
    """A box in a global tensor: ``offsets`` of its first element and its ``shape``.

    Example:
        >>> ShardRegion((2, 0), (3, 4)).stop
        (5, 4)
    """

    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.offsets) != len(self.shape):
            raise ValueError(f"region offsets {list(self.offsets)} and shape {list(self.shape)} differ in rank")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.shape):
            raise ValueError(f"region offsets {list(self.offsets)} / shape {list(self.shape)} must be >= 0")

    @property
    def stop(self) -> tuple[int, ...]:
        """Exclusive end along each dimension."""
        return tuple(o + s for o, s in zip(self.offsets, self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def check_within(self, global_shape: Sequence[int], what: str) -> None:
        """Raise ValueError naming ``what`` if the region does not fit ``global_shape``."""
        if len(global_shape) != len(self.shape) or any(e > n for e, n in zip(self.stop, global_shape)):
            raise ValueError(
                f"{what}: region at {list(self.offsets)} of shape {list(self.shape)} "
                f"does not fit the global shape {list(global_shape)}"
            )


@dataclass(frozen=True)
class ArrayLayout:
    """How one logical tensor is stored: its zarr array's dtype, shape, chunks, attributes.

    Attributes:
        key: the state key (``rank-00001/optim/state/0/exp_avg``).
        dtype: the logical dtype name (``"bfloat16"``), as in the manifest.
        shape: the global shape.
        storage_dtype: the zarr data type the bytes are stored as (``"uint16"``).
        chunks: the chunk shape (same rank as ``shape``; ``()`` for 0-d arrays).
        attributes: the array's zarr attributes (``{"recoverkit": {"key", "dtype", ...}}``).
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    storage_dtype: str
    chunks: tuple[int, ...]
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The array's path relative to the step group."""
        return array_path(self.key)

    @property
    def itemsize(self) -> int:
        return dtype_from_name(self.dtype).itemsize

    def zarr_metadata(self, codecs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The array's ``zarr.json`` (zarr v3) with the given codec chain."""
        return {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(self.shape),
            "data_type": self.storage_dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": _fill_value(self.storage_dtype),
            "codecs": [dict(c) for c in codecs],
            "attributes": dict(self.attributes),
        }

    @classmethod
    def from_zarr_metadata(cls, meta: Mapping[str, Any], *, where: str = "<zarr.json>") -> ArrayLayout:
        """Parse an array's ``zarr.json`` written by :meth:`zarr_metadata`.

        Raises:
            IncompatibleCheckpointError: not a recoverkit zarr v3 array (names ``where``).
        """
        try:
            if meta["zarr_format"] != 3 or meta["node_type"] != "array":
                raise KeyError("zarr_format/node_type")
            info = meta["attributes"][_ATTR]
            shape = tuple(int(x) for x in meta["shape"])
            chunks = tuple(int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"])
            layout = cls(str(info["key"]), str(info["dtype"]), shape, str(meta["data_type"]), chunks, dict(meta["attributes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise IncompatibleCheckpointError(f"{where}: not a recoverkit zarr v3 array ({e!r} missing or malformed)") from e
        if layout.storage_dtype != storage_dtype(layout.dtype):
            raise IncompatibleCheckpointError(
                f"{where}: logical dtype {layout.dtype} must be stored as {storage_dtype(layout.dtype)}, "
                f"found data_type {layout.storage_dtype}"
            )
        return layout


def storage_dtype(logical: str) -> str:
    """The zarr v3 data type a logical torch dtype is stored as.

    Natively readable dtypes are stored as themselves; every other dtype as the unsigned
    integer of the same width, with the logical dtype kept in the array attributes.

    Raises:
        IncompatibleCheckpointError: ``logical`` is not a storable dtype name.

    Example:
        >>> storage_dtype("bfloat16"), storage_dtype("float8_e4m3fn"), storage_dtype("complex64")
        ('uint16', 'uint8', 'complex64')
    """
    itemsize = dtype_from_name(logical).itemsize
    name = str(dtype_from_name(logical)).removeprefix("torch.")
    if name in NATIVE_DTYPES:
        return name
    return f"uint{8 * itemsize}"


def chunk_shape_for(
    global_shape: Sequence[int],
    regions: Sequence[ShardRegion],
    *,
    itemsize: int = 1,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    min_chunk_bytes: int = MIN_CHUNK_BYTES,
) -> tuple[int, ...]:
    """A chunk shape whose grid is aligned to every shard boundary in ``regions``.

    Along each dimension the chunk extent is the gcd of the interior shard boundaries (the
    whole dimension when there are none), so every region is a union of whole chunks. Then
    chunks above ``max_chunk_bytes`` are split by divisors (outer dimensions first, still
    aligned), and chunks below ``min_chunk_bytes`` are grown (outer dimensions first, no
    longer aligned) unless they already cover the array.

    Example:
        >>> chunk_shape_for((8, 6), [ShardRegion((0, 0), (4, 6)), ShardRegion((4, 0), (4, 6))], min_chunk_bytes=1)
        (4, 6)
        >>> regions = [ShardRegion((0,), (4,)), ShardRegion((4,), (2,)), ShardRegion((6,), (4,))]
        >>> chunk_shape_for((10,), regions, min_chunk_bytes=1)
        (2,)
    """
    shape = tuple(int(n) for n in global_shape)
    for r in regions:
        r.check_within(shape, "chunk_shape_for")
    chunks = [_aligned_extent(n, d, regions) for d, n in enumerate(shape)]
    chunks = _split_to_max(chunks, itemsize, max_chunk_bytes)
    if math.prod(chunks) * itemsize < min_chunk_bytes:
        chunks = _grow_to_min(chunks, shape, itemsize, min_chunk_bytes)
    return tuple(chunks)


def _aligned_extent(n: int, dim: int, regions: Sequence[ShardRegion]) -> int:
    """gcd of the interior shard boundaries along ``dim`` (``n`` if none; >= 1)."""
    g = 0
    for r in regions:
        for b in (r.offsets[dim], r.stop[dim]):
            if 0 < b < n:
                g = math.gcd(g, b)
    return max(1, g or n)


def _split_to_max(chunks: list[int], itemsize: int, max_bytes: int) -> list[int]:
    """Shrink chunk extents by their divisors, outer dims first, until under ``max_bytes``."""
    out = list(chunks)
    for d in range(len(out)):
        inner = math.prod(out[d + 1 :]) * itemsize
        if math.prod(out) * itemsize <= max_bytes:
            break
        out[d] = _largest_divisor_at_most(out[d], max(1, max_bytes // max(1, inner)))
    return out


def _grow_to_min(chunks: list[int], shape: tuple[int, ...], itemsize: int, min_bytes: int) -> list[int]:
    """Grow chunk extents (outer dims first, up to the array) until at least ``min_bytes``."""
    out = list(chunks)
    for d in range(len(out)):
        cur = math.prod(out) * itemsize
        if cur >= min_bytes:
            break
        factor = -(-min_bytes // max(1, cur))
        out[d] = max(1, min(max(shape[d], 1), out[d] * factor))
    return out


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (>= 1)."""
    if n <= limit:
        return n
    best = 1
    i = 1
    while i * i <= n:
        if n % i == 0:
            for c in (i, n // i):
                if best < c <= limit:
                    best = c
        i += 1
    return best


def array_layout(key: str, dtype_name: str, global_shape: Sequence[int], regions: Sequence[ShardRegion]) -> ArrayLayout:
    """The layout of the array holding state key ``key``, chunked to fit ``regions``.

    Example:
        >>> lay = array_layout("model/w", "bfloat16", (4, 2), [ShardRegion((0, 0), (4, 2))])
        >>> lay.storage_dtype, lay.chunks, lay.attributes["recoverkit"]["dtype"]
        ('uint16', (4, 2), 'bfloat16')
    """
    shape = tuple(int(n) for n in global_shape)
    stored = storage_dtype(dtype_name)
    itemsize = dtype_from_name(dtype_name).itemsize
    chunks = chunk_shape_for(shape, regions, itemsize=itemsize)
    attrs = {_ATTR: {"key": key, "dtype": dtype_name, "storage_dtype": stored}}
    return ArrayLayout(key, dtype_name, shape, stored, chunks, attrs)


def array_name(key: str) -> str:
    """A safe, deterministic, collision-free zarr node name for a state key.

    Characters ``A-Z a-z 0-9 . _ -`` are kept; every other byte of the UTF-8 key (``/``
    included) becomes ``~`` and two lowercase hex digits, so the mapping is injective. Names
    zarr reserves (empty, only periods, a leading ``__``) get their first byte escaped.
    Names longer than 180 bytes keep a readable prefix and end in ``~~`` plus a SHA-256
    digest of the key (``~~`` never occurs in a short name).

    Example:
        >>> array_name("rank-00001/optim/state/0/exp_avg")
        'rank-00001~2foptim~2fstate~2f0~2fexp_avg'
        >>> array_name("__rng__/torch"), array_name("")
        ('~5f_rng__~2ftorch', '~')
    """
    if key == "":
        return "~"
    out = []
    for i, ch in enumerate(key):
        reserved = i == 0 and (key.startswith("__") or set(key) == {"."})
        if _SAFE.fullmatch(ch) and not reserved:
            out.append(ch)
        else:
            out.extend(f"~{b:02x}" for b in ch.encode("utf-8"))
    name = "".join(out)
    if len(name) > _MAX_NAME:
        name = name[: _MAX_NAME - 34] + "~~" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return name


def array_path(key: str) -> str:
    """The array's path relative to the step group (``tensors/<array name>``).

    Example:
        >>> array_path("model/fc.weight")
        'tensors/model~2ffc.weight'
    """
    return f"{ARRAYS_GROUP}/{array_name(key)}"


def group_metadata(attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A zarr v3 group's ``zarr.json``."""
    return {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes or {})}


def _fill_value(stored: str) -> Any:
    """Zero in the JSON form zarr v3 requires for ``stored``."""
    if stored == "bool":
        return False
    if stored.startswith("complex"):
        return [0.0, 0.0]
    if stored.startswith("float"):
        return 0.0
    return 0
