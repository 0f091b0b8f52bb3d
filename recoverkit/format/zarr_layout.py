"""The zarr v3 layout of a persistent-tier step: node names, dtypes and chunk grids.

The store root and every step are zarr v3 groups; a tensor's state key names its place in
the step's hierarchy, one path component per ``/``-separated part of the key::

    zarr.json                                       the store root: a group
    step-000001200/zarr.json                        a step: a group (attributes: step)
    step-000001200/model/zarr.json                  group "model"
    step-000001200/model/fc.weight/zarr.json        array "fc.weight": tensor model/fc.weight
    step-000001200/model/fc.weight/c/0/0            its chunks (bytes [+ zstd|blosc] + crc32c)
    step-000001200/.recoverkit/blobs/rank-00000/    each rank's object tree: a uint8 array
    step-000001200/.recoverkit/manifest/            the manifest: a uint8 array, written last

So ``zarr.open_group(root)["step-000001200"]["model"]["fc.weight"]`` is the tensor
``model/fc.weight``, and walking a step with zarr-python meets nothing but groups and
arrays. recoverkit's own objects (the manifest, the blobs) are arrays of raw bytes (one
chunk, the ``bytes`` codec only, so the chunk *is* the object) under ``.recoverkit``, a
name no tensor can map to.

**Node names** (:func:`node_name`). Characters ``A-Z a-z 0-9 . _ -`` are kept; every other
byte of the UTF-8 component (``~`` included) becomes ``~`` and two lowercase hex digits, so
the mapping is injective. A first character that would make the name reserved or hidden
(a leading ``.``, which also covers names of periods only and ``.recoverkit``; a leading
``__``) is escaped the same way; an empty component is ``~``. Components longer than 180
bytes keep a readable prefix and end in ``~~`` plus a SHA-256 digest.

**Collisions** (:func:`array_paths`). A node is a group or an array, not both: when a
tensor's path is also a group of other tensors' paths (tensors ``a`` and ``a/b``), that
tensor's array is ``a~`` (a name ending in a lone ``~`` is never produced by the escape).
The path an array was written at is recorded in the manifest (each shard's ``file``) and
in the array's attributes (its key), so readers never guess.

**Previous layout** (:func:`legacy_array_path`). Steps written before nesting hold every
array flat under a ``tensors`` group as ``tensors/<array_name(key)>`` (``/`` escaped as
``~2f``), their blobs at ``blobs/rank-NNNNN.json`` and their manifest at
``manifest.json``; readers accept both (the manifest tells which).

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleCheckpointError
from .dtypes import canonical_name
from .dtypes import itemsize as dtype_itemsize

__all__ = [
    "ARRAYS_GROUP",
    "INTERNAL_GROUP",
    "MANIFEST_ARRAY",
    "BLOBS_GROUP",
    "blob_path",
    "node_name",
    "array_paths",
    "array_path_candidates",
    "group_paths",
    "legacy_array_path",
    "bytes_array_metadata",
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

#: The sub-group of a previous-layout step that held every array (flat, escaped names).
ARRAYS_GROUP = "tensors"
#: The group of a step holding recoverkit's own objects; no tensor maps to this name.
INTERNAL_GROUP = ".recoverkit"
#: The manifest: a uint8 array whose one chunk is the manifest's bytes (its zarr.json last).
MANIFEST_ARRAY = f"{INTERNAL_GROUP}/manifest"
#: The group of the per-rank object trees (uint8 arrays ``rank-NNNNN``).
BLOBS_GROUP = f"{INTERNAL_GROUP}/blobs"
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
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:  # the natural path; array_paths() gives the collision-free one
            object.__setattr__(self, "path", array_path(self.key))

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

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
    def from_zarr_metadata(cls, meta: Mapping[str, Any], *, where: str = "<zarr.json>", path: str = "") -> ArrayLayout:
        """Parse an array's ``zarr.json`` written by :meth:`zarr_metadata` (stored at ``path``).

        Raises:
            IncompatibleCheckpointError: not a recoverkit zarr v3 array (names ``where``).
        """
        try:
            if meta["zarr_format"] != 3 or meta["node_type"] != "array":
                raise KeyError("zarr_format/node_type")
            info = meta["attributes"][_ATTR]
            shape = tuple(int(x) for x in meta["shape"])
            chunks = tuple(int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"])
            key = str(info["key"])
            layout = cls(key, str(info["dtype"]), shape, str(meta["data_type"]), chunks, dict(meta["attributes"]), path)
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
    itemsize = dtype_itemsize(logical)
    name = canonical_name(logical)
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


def array_layout(
    key: str, dtype_name: str, global_shape: Sequence[int], regions: Sequence[ShardRegion], *, path: str = ""
) -> ArrayLayout:
    """The layout of the array holding state key ``key`` (at ``path``; default its natural
    path), chunked to fit ``regions``.

    Example:
        >>> lay = array_layout("model/w", "bfloat16", (4, 2), [ShardRegion((0, 0), (4, 2))])
        >>> lay.storage_dtype, lay.chunks, lay.attributes["recoverkit"]["dtype"]
        ('uint16', (4, 2), 'bfloat16')
    """
    shape = tuple(int(n) for n in global_shape)
    stored = storage_dtype(dtype_name)
    itemsize = dtype_itemsize(dtype_name)
    chunks = chunk_shape_for(shape, regions, itemsize=itemsize)
    attrs = {_ATTR: {"key": key, "dtype": dtype_name, "storage_dtype": stored}}
    return ArrayLayout(key, dtype_name, shape, stored, chunks, attrs, path)


def node_name(part: str) -> str:
    """A safe, deterministic, injective zarr node name for one ``/``-separated part of a key.

    Example:
        >>> node_name("fc.weight"), node_name("__rng__"), node_name(".hidden"), node_name("a b"), node_name("")
        ('fc.weight', '~5f_rng__', '~2ehidden', 'a~20b', '~')
    """
    return _escape(part, reserved_start=part.startswith((".", "__")))


def array_path(key: str) -> str:
    """The natural path of ``key``'s array relative to the step group: one node per part.

    The path actually used is :func:`array_paths`' (it differs only for a key whose path is
    also a group of other keys).

    Example:
        >>> array_path("model/fc.weight"), array_path("rank-00001/optim/state/0/exp_avg")
        ('model/fc.weight', 'rank-00001/optim/state/0/exp_avg')
        >>> array_path("__rng__/torch")
        '~5f_rng__/torch'
    """
    return "/".join(node_name(p) for p in key.split("/"))


def array_paths(keys: Iterable[str]) -> dict[str, str]:
    """Key -> the collision-free path of its array, for a step holding exactly ``keys``.

    A key whose natural path is also a group of another key's path gets ``~`` appended.

    Example:
        >>> array_paths(["a", "a/b", "c"])
        {'a': 'a~', 'a/b': 'a/b', 'c': 'c'}
    """
    natural = {k: array_path(k) for k in keys}
    groups = group_paths(natural.values())
    return {k: f"{p}~" if p in groups else p for k, p in natural.items()}


def array_path_candidates(key: str) -> tuple[str, str, str]:
    """Every path ``key``'s array may have been written at: natural, collision-renamed, and
    the previous (flat) layout's."""
    natural = array_path(key)
    return natural, f"{natural}~", legacy_array_path(key)


def group_paths(paths: Iterable[str]) -> set[str]:
    """Every proper prefix (a group) of the given node paths.

    Example:
        >>> sorted(group_paths(["m/a/w", "m/b"]))
        ['m', 'm/a']
    """
    out: set[str] = set()
    for p in paths:
        parts = p.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def blob_path(rank: int) -> str:
    """The path of rank ``rank``'s object-tree array relative to the step group."""
    return f"{BLOBS_GROUP}/rank-{rank:05d}"


def bytes_array_metadata(nbytes: int, attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``zarr.json`` of a uint8 array of ``nbytes`` whose one chunk ``c/0`` is the raw bytes."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [nbytes],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, nbytes)]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}],
        "attributes": dict(attributes or {}),
    }


def array_name(key: str) -> str:
    """The previous layout's flat array name of a whole key (``/`` escaped too).

    Example:
        >>> array_name("rank-00001/optim/state/0/exp_avg")
        'rank-00001~2foptim~2fstate~2f0~2fexp_avg'
        >>> array_name("__rng__/torch"), array_name("")
        ('~5f_rng__~2ftorch', '~')
    """
    return _escape(key, reserved_start=key.startswith("__") or set(key) == {"."})


def _escape(text: str, *, reserved_start: bool) -> str:
    """``text`` with every byte outside the safe set (and a reserved first character) as
    ``~hh``; ``~`` for the empty name; over-long names cut and completed by a hash."""
    if text == "":
        return "~"
    out = []
    for i, ch in enumerate(text):
        if _SAFE.fullmatch(ch) and not (i == 0 and reserved_start):
            out.append(ch)
        else:
            out.extend(f"~{b:02x}" for b in ch.encode("utf-8"))
    name = "".join(out)
    if len(name) > _MAX_NAME:
        name = name[: _MAX_NAME - 34] + "~~" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    return name


def legacy_array_path(key: str) -> str:
    """The previous layout's array path (``tensors/<array name>``).

    Example:
        >>> legacy_array_path("model/fc.weight")
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
