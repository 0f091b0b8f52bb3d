"""The zarr layout of tier 3: storage dtypes, shard-aligned chunk grids, array names."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from recoverkit.errors import IncompatibleCheckpointError
from recoverkit.format.zarr_layout import (
    ARRAYS_GROUP,
    INTERNAL_GROUP,
    NATIVE_DTYPES,
    ArrayLayout,
    ShardRegion,
    array_layout,
    array_name,
    array_path,
    array_path_candidates,
    array_paths,
    chunk_shape_for,
    group_paths,
    legacy_array_path,
    storage_dtype,
)
from recoverkit.state.dtypes import STORABLE_DTYPES, dtype_name


@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
def test_storage_dtype_is_native_or_same_width_unsigned(dtype):
    name = dtype_name(dtype)
    stored = storage_dtype(name)
    assert np.dtype(stored).itemsize == dtype.itemsize
    if name in NATIVE_DTYPES:
        assert stored == name
    else:
        assert stored == f"uint{8 * dtype.itemsize}"


def test_storage_dtype_of_the_dtypes_zarr_python_cannot_read():
    assert storage_dtype("bfloat16") == "uint16"
    assert {storage_dtype(n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")} == {"uint8"}
    assert storage_dtype("complex32") == "uint32"
    assert storage_dtype("half") == "float16"  # aliases resolve to the canonical dtype
    with pytest.raises(IncompatibleCheckpointError, match="qint8"):
        storage_dtype("qint8")


def _assert_aligned(chunks, regions, shape):
    """Every region is a union of whole chunks: its start and end lie on the grid (or the edge)."""
    for r in regions:
        for d, (o, e) in enumerate(zip(r.offsets, r.stop)):
            assert o % chunks[d] == 0, (chunks, r)
            assert e % chunks[d] == 0 or e == shape[d], (chunks, r)


def _rows(shape, cuts):
    """Regions splitting ``shape`` along dim 0 at ``cuts``."""
    edges = [0, *cuts, shape[0]]
    return [ShardRegion((a,) + (0,) * (len(shape) - 1), (b - a, *shape[1:])) for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize(
    "shape,regions",
    [
        ((1024, 512), _rows((1024, 512), [512])),
        ((1000, 300), _rows((1000, 300), [250, 500, 750])),
        ((999, 64), _rows((999, 64), [333, 666])),
        ((4096, 4096), [ShardRegion((0, 0), (4096, 2048)), ShardRegion((0, 2048), (4096, 2048))]),
        ((6000, 8), _rows((6000, 8), [1200, 2400, 3000, 4500])),
    ],
)
def test_chunk_grid_is_aligned_to_every_shard(shape, regions):
    chunks = chunk_shape_for(shape, regions, itemsize=4, min_chunk_bytes=1)
    _assert_aligned(chunks, regions, shape)
    # and it is the coarsest such grid below the cap: not needlessly small
    assert math.prod(chunks) * 4 > 1


def test_two_ranks_of_a_tensor_parallel_split_never_share_a_chunk():
    shape = (4096, 1024)
    rank0, rank1 = ShardRegion((0, 0), (4096, 512)), ShardRegion((0, 512), (4096, 512))
    chunks = chunk_shape_for(shape, [rank0, rank1], itemsize=2)
    assert chunks[1] == 512  # the split column is a chunk boundary
    _assert_aligned(chunks, [rank0, rank1], shape)


def test_huge_chunks_are_split_and_stay_aligned():
    shape = (50257, 4096)  # a vocabulary embedding split in two at an odd row
    regions = _rows(shape, [25129])
    chunks = chunk_shape_for(shape, regions, itemsize=4, max_chunk_bytes=32 << 20)
    assert math.prod(chunks) * 4 <= 32 << 20
    _assert_aligned(chunks, regions, shape)


def test_absurdly_small_aligned_chunks_are_grown():
    shape = (1 << 20,)
    cuts = [4096 * k + 1 for k in range(1, 200)]  # boundaries with gcd 1: 4-byte chunks if aligned
    chunks = chunk_shape_for(shape, _rows(shape, cuts), itemsize=4, min_chunk_bytes=256 << 10)
    assert chunks[0] * 4 >= 256 << 10


def test_small_arrays_are_one_chunk():
    assert chunk_shape_for((7, 3), [ShardRegion((0, 0), (7, 3))], itemsize=4) == (7, 3)
    assert chunk_shape_for((10,), _rows((10,), [4]), itemsize=4) == (10,)


def test_chunk_shapes_of_zero_d_and_empty_arrays():
    assert chunk_shape_for((), [ShardRegion((), ())], itemsize=8) == ()
    assert chunk_shape_for((0, 5), [ShardRegion((0, 0), (0, 5))], itemsize=4) == (1, 5)
    assert all(c >= 1 for c in chunk_shape_for((0,), [], itemsize=4))


def test_a_region_outside_the_array_is_refused():
    with pytest.raises(ValueError, match=r"does not fit the global shape \[4, 4\]"):
        chunk_shape_for((4, 4), [ShardRegion((2, 0), (3, 4))])
    with pytest.raises(ValueError, match="differ in rank"):
        ShardRegion((0,), (1, 2))


_TRICKY_KEYS = [
    "model/fc.weight",
    "model~2ffc.weight",
    "model.fc.weight",
    "model_fc.weight",
    "rank-00001/optim/state/0/exp_avg",
    "rank-00001~2foptim/state/0/exp_avg",
    "__rng__/torch",
    "~5f_rng__/torch",
    "_rng",
    "",
    "~",
    ".",
    "..",
    "a b",
    "a%20b",
    "é/ü",
    "x" * 400,
    "x" * 399 + "y",
    "tensors",
    "manifest.json",
]


def test_array_names_are_safe_deterministic_and_collision_free():
    names = [array_name(k) for k in _TRICKY_KEYS]
    assert len(set(names)) == len(names), "two keys share an array name"
    assert names == [array_name(k) for k in _TRICKY_KEYS]
    for k, n in zip(_TRICKY_KEYS, names):
        assert re.fullmatch(r"[A-Za-z0-9._~-]+", n), (k, n)
        assert n not in ("", ".", "..") and not n.startswith("__"), (k, n)
        assert len(n.encode()) <= 180
    assert array_name("model/fc.weight") == "model~2ffc.weight"  # readable for common keys


def test_array_paths_nest_one_node_per_key_part():
    assert array_path("model/fc.weight") == "model/fc.weight"
    assert array_path("rank-00001/optim/state/0/exp_avg") == "rank-00001/optim/state/0/exp_avg"
    assert array_path("manifest.json") == "manifest.json"
    for k in _TRICKY_KEYS:
        parts = array_path(k).split("/")
        assert len(parts) == k.count("/") + 1
        for n in parts:  # every node name valid for zarr, none hidden or reserved
            assert re.fullmatch(r"[A-Za-z0-9._~-]+", n), (k, n)
            assert not n.startswith((".", "__")), (k, n)
            assert len(n.encode()) <= 180
    paths = [array_path(k) for k in _TRICKY_KEYS]
    assert len(set(paths)) == len(paths), "two keys share an array path"
    assert INTERNAL_GROUP not in {p.split("/")[0] for p in paths}  # no tensor lands among recoverkit's nodes


def test_a_key_that_is_also_a_group_gets_a_tilde():
    keys = ["a", "a/b", "a/b/c", "x", ".recoverkit", "__rng__/torch", "a~"]
    paths = array_paths(keys)
    assert paths == {"a": "a~", "a/b": "a/b~", "a/b/c": "a/b/c", "x": "x", ".recoverkit": "~2erecoverkit",
                     "__rng__/torch": "~5f_rng__/torch", "a~": "a~7e"}
    assert len(set(paths.values())) == len(keys)
    assert not set(paths.values()) & group_paths(paths.values())  # no node both an array and a group
    for k, p in paths.items():
        assert p in array_path_candidates(k)
    assert array_path_candidates("model/w") == ("model/w", "model/w~", "tensors/model~2fw")


def test_previous_layout_paths_are_flat_under_tensors():
    assert legacy_array_path("manifest.json") == "tensors/manifest.json"
    assert {legacy_array_path(k).split("/")[0] for k in _TRICKY_KEYS} == {ARRAYS_GROUP}
    assert all(legacy_array_path(k).count("/") == 1 for k in _TRICKY_KEYS)


def test_array_layout_and_its_zarr_metadata_round_trip():
    lay = array_layout("rank-00000/w", "bfloat16", (8, 4), _rows((8, 4), [4]))
    assert (lay.storage_dtype, lay.shape, lay.path) == ("uint16", (8, 4), "rank-00000/w")
    assert lay.attributes["recoverkit"] == {"key": "rank-00000/w", "dtype": "bfloat16", "storage_dtype": "uint16"}
    meta = lay.zarr_metadata([{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}])
    assert meta["data_type"] == "uint16" and meta["chunk_grid"]["configuration"]["chunk_shape"] == list(lay.chunks)
    assert ArrayLayout.from_zarr_metadata(meta) == lay
    renamed = array_layout("a", "float32", (2,), [ShardRegion((0,), (2,))], path="a~")
    assert ArrayLayout.from_zarr_metadata(renamed.zarr_metadata([]), path="a~") == renamed


def test_metadata_that_is_not_ours_is_refused():
    lay = array_layout("w", "bfloat16", (4,), [ShardRegion((0,), (4,))])
    meta = lay.zarr_metadata([])
    with pytest.raises(IncompatibleCheckpointError, match="must be stored as uint16"):
        ArrayLayout.from_zarr_metadata({**meta, "data_type": "float16"}, where="x/zarr.json")
    with pytest.raises(IncompatibleCheckpointError, match="x/zarr.json: not a recoverkit"):
        ArrayLayout.from_zarr_metadata({**meta, "attributes": {}}, where="x/zarr.json")
