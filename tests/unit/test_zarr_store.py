"""ZarrStore on real files: bit-exact dtypes, sharded writes read back resharded, zarr-python
and tensorstore interoperability, corruption detection, compression, small objects."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import tensorstore as ts
import torch

from recoverkit.errors import CheckpointNotFoundError, ConfigError, IntegrityError
from recoverkit.format.zarr_layout import ShardRegion, array_layout, array_path
from recoverkit.state.dtypes import STORABLE_DTYPES, dtype_name, from_bytes, to_bytes_view
from recoverkit.storage.faults import FaultInjector, FaultyFS
from recoverkit.storage.zarr_store import ZarrStore

STEP = "step-000000007"


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes of ``dtype`` (NaN payloads included); bool gets 0/1."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (n,), dtype=torch.uint8, generator=g)
    return from_bytes(raw, dtype, shape)


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(to_bytes_view(t.contiguous()).numpy())


def _whole(key, t):
    shape = tuple(t.shape)
    region = ShardRegion((0,) * len(shape), shape)
    return array_layout(key, dtype_name(t.dtype), shape, [region]), region


def _save(store, tensors: dict[str, torch.Tensor]):
    """Create a step holding ``tensors`` whole; return their layouts."""
    lays = {k: _whole(k, t) for k, t in tensors.items()}
    store.create_step(STEP, [lay for lay, _ in lays.values()], {"recoverkit": {"step": 7}})
    store.write_regions(STEP, [(lay, region, tensors[k]) for k, (lay, region) in lays.items()])
    return {k: lay for k, (lay, _) in lays.items()}


@pytest.fixture
def url(tmp_path):
    return "file://" + str(tmp_path / "zarr")


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "zarr")


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(url, dtype):
    tensors = {"t/2d": _random(dtype, (5, 3)), "t/0d": _random(dtype, (), 1), "t/empty": _random(dtype, (0, 4), 2)}
    store = ZarrStore(url)
    _save(store, tensors)
    reader = ZarrStore(url)  # a fresh process's view: nothing cached
    for k, t in tensors.items():
        back = reader.read_region(STEP, k, (0,) * t.dim(), tuple(t.shape))
        assert back.dtype == t.dtype and back.shape == t.shape
        assert _bytes(back) == _bytes(t), k


def test_read_region_fills_the_callers_tensor_in_place(url):
    t = torch.randn(64, 16)
    store = ZarrStore(url)
    _save(store, {"w": t})
    buf = torch.zeros(16 * 16 * 4, dtype=torch.uint8)
    out = from_bytes(buf, torch.float32, (16, 16))
    got = store.read_region(STEP, "w", (8, 0), (16, 16), out=out)
    assert got is out and got.data_ptr() == buf.data_ptr()
    assert torch.equal(from_bytes(buf, torch.float32, (16, 16)), t[8:24])


def test_sharded_regions_from_two_ranks_read_back_resharded(url, root):
    full = torch.randn(64, 1024).to(torch.bfloat16)
    halves = [ShardRegion((0, 0), (64, 512)), ShardRegion((0, 512), (64, 512))]  # split along dim 1
    lay = array_layout("emb", "bfloat16", (64, 1024), halves)
    assert lay.chunks == (64, 512)
    ZarrStore(url).create_step(STEP, [lay], {})
    # rank 0 alone first: only its own chunks exist afterwards
    rank0, rank1 = ZarrStore(url), ZarrStore(url)
    rank0.write_regions(STEP, [(rank0.read_layout(STEP, "emb"), halves[0], full[:, :512].contiguous())])
    chunk_dir = os.path.join(root, STEP, array_path("emb"), "c")
    written = {os.path.relpath(os.path.join(d, f), chunk_dir) for d, _, fs in os.walk(chunk_dir) for f in fs}
    assert written == {"0/0"}, "rank 0 wrote outside its own chunks"
    rank1.write_regions(STEP, [(rank1.read_layout(STEP, "emb"), halves[1], full[:, 512:].contiguous())])
    reader = ZarrStore(url)
    for a in (0, 21, 42):  # three "ranks" reading row blocks of a resharded world
        got = reader.read_region(STEP, "emb", (a, 0), (min(21, 64 - a), 1024))
        assert torch.equal(got.view(torch.uint16), full[a : a + 21].view(torch.uint16))
    assert torch.equal(reader.read_region(STEP, "emb", (3, 500), (5, 30)), full[3:8, 500:530])


def test_pieces_of_one_rank_in_one_call(url):
    full = torch.arange(40, dtype=torch.int64).reshape(20, 2)
    pieces = [ShardRegion((a, 0), (5, 2)) for a in range(0, 20, 5)]
    lay = array_layout("p", "int64", (20, 2), pieces)
    store = ZarrStore(url)
    store.create_step(STEP, [lay], {})
    store.write_regions(STEP, [(lay, r, full[r.offsets[0] : r.stop[0]]) for r in pieces])
    assert torch.equal(store.read_region(STEP, "p", (0, 0), (20, 2)), full)


# ------------------------------------------------------------- interoperability
def _mixed():
    return {
        "model/w": torch.randn(33, 7),
        "model/b": torch.randn(5).to(torch.bfloat16),
        "rank-00001/opt/step": torch.tensor(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "z": torch.randn(4, dtype=torch.complex64),
        "f8": _random(torch.float8_e4m3fn, (6,)),
    }


def test_zarr_python_opens_every_array_and_reads_the_same_values(url, root):
    zarr = pytest.importorskip("zarr")
    tensors = _mixed()
    _save(ZarrStore(url), tensors)
    group = zarr.open_group(os.path.join(root, STEP), mode="r")
    assert group.attrs["recoverkit"] == {"step": 7}
    for k, t in tensors.items():
        a = zarr.open_array(os.path.join(root, STEP, array_path(k)), mode="r")
        info = a.attrs["recoverkit"]
        assert info["key"] == k and info["dtype"] == dtype_name(t.dtype)
        values = np.asarray(a[...])
        if dtype_name(t.dtype) in ("bfloat16", "float8_e4m3fn"):
            assert str(a.dtype) == info["storage_dtype"]  # stored as uintN: view it back
            assert _bytes(torch.from_numpy(values.copy()).view(t.dtype)) == _bytes(t)
        else:
            np.testing.assert_array_equal(values, t.numpy())
    top = {array_path(k).split("/")[0] for k in tensors}
    assert {n for n, _ in group.members()} == top  # nested: the first part of every key
    for k in tensors:  # and each array is reachable group by group
        node = group
        for part in array_path(k).split("/"):
            node = node[part]
        assert node.attrs["recoverkit"]["key"] == k


def test_tensorstore_opens_it_with_a_plain_spec(url, root):
    tensors = _mixed()
    _save(ZarrStore(url), tensors)
    for k in ("model/w", "mask", "z"):
        arr = ts.open({"driver": "zarr3", "kvstore": f"{url}/{STEP}/{array_path(k)}/"}, open=True, read=True).result()
        np.testing.assert_array_equal(arr.read().result(), tensors[k].numpy())
    bf = ts.open({"driver": "zarr3", "kvstore": f"{url}/{STEP}/{array_path('model/b')}/"}, open=True).result()
    assert bf.dtype == ts.uint16
    np.testing.assert_array_equal(bf.read().result(), tensors["model/b"].view(torch.uint16).numpy())


@pytest.mark.parametrize("compression", [None, "none", "zstd", "blosc"])
def test_codecs_end_with_crc32c_and_compression_compresses(url, root, compression):
    t = torch.zeros(256, 256)  # compressible
    t[::7] = 1.5
    store = ZarrStore(url, compression=compression, level=3)
    _save(store, {"w": t})
    meta = json.loads(open(os.path.join(root, STEP, array_path("w"), "zarr.json")).read())
    names = [c["name"] for c in meta["codecs"]]
    want = {None: [], "none": [], "zstd": ["zstd"], "blosc": ["blosc"]}[compression]
    assert names == ["bytes", *want, "crc32c"]
    chunk = os.path.join(root, STEP, array_path("w"), "c", "0", "0")
    size = os.path.getsize(chunk)
    assert (size < t.numel() * 4 // 4) if want else size == t.numel() * 4 + 4
    assert torch.equal(ZarrStore(url).read_region(STEP, "w", (0, 0), (256, 256)), t)


def test_unknown_compression_is_a_config_error(url):
    with pytest.raises(ConfigError, match="lz77"):
        ZarrStore(url, compression="lz77")


# ------------------------------------------------------------------- integrity
def test_a_flipped_byte_in_a_chunk_is_detected(url, root):
    n = 1 << 15  # two 128 KiB halves: two chunks
    pieces = [ShardRegion((0,), (n,)), ShardRegion((n,), (n,))]
    lay = array_layout("layer/w", "float32", (2 * n,), pieces)
    assert lay.chunks == (n,)
    store = ZarrStore(url)
    store.create_step(STEP, [lay], {})
    data = torch.randn(2 * n)
    store.write_regions(STEP, [(lay, r, data[r.offsets[0] : r.stop[0]]) for r in pieces])
    chunk = os.path.join(root, STEP, array_path("layer/w"), "c", "1")
    assert os.path.isfile(chunk), os.listdir(os.path.dirname(chunk))
    with open(chunk, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x10]))
    reader = ZarrStore(url)
    assert torch.equal(reader.read_region(STEP, "layer/w", (0,), (n,)), data[:n])  # chunk 0 is fine
    with pytest.raises(IntegrityError) as err:
        reader.read_region(STEP, "layer/w", (0,), (2 * n,))
    msg = str(err.value)
    assert url in msg and array_path("layer/w") in msg and "chunk c/1" in msg and "'layer/w'" in msg


def test_a_missing_chunk_is_detected_not_read_as_zeros(url, root):
    t = torch.zeros(8192, 4)  # equal to the fill value: still stored, so its loss is visible
    halves = [ShardRegion((0, 0), (4096, 4)), ShardRegion((4096, 0), (4096, 4))]
    lay = array_layout("zeros", "float32", (8192, 4), halves)
    store = ZarrStore(url)
    store.create_step(STEP, [lay], {})
    store.write_regions(STEP, [(lay, halves[0], t[:4096]), (lay, halves[1], t[4096:])])
    os.remove(os.path.join(root, STEP, array_path("zeros"), "c", "1", "0"))
    with pytest.raises(IntegrityError, match=r"chunk c/1/0 is missing"):
        ZarrStore(url).read_region(STEP, "zeros", (0, 0), (8192, 4))


def test_missing_arrays_and_objects_are_not_found(url):
    store = ZarrStore(url)
    _save(store, {"w": torch.ones(2)})
    with pytest.raises(CheckpointNotFoundError, match=rf"{STEP}/nope/zarr.json"):
        store.read_region(STEP, "nope", (0,), (1,))
    with pytest.raises(CheckpointNotFoundError, match="step-000000008"):
        store.read_layout("step-000000008", "w")
    with pytest.raises(CheckpointNotFoundError, match="blobs/rank-00003.json"):
        store.read_bytes(f"{STEP}/blobs/rank-00003.json")


def test_a_tensor_that_does_not_match_its_layout_is_refused(url):
    store = ZarrStore(url)
    lays = _save(store, {"w": torch.ones(4, 2)})
    with pytest.raises(ValueError, match="dtype float64, the array stores float32"):
        store.write_regions(STEP, [(lays["w"], ShardRegion((0, 0), (4, 2)), torch.ones(4, 2, dtype=torch.float64))])
    with pytest.raises(ValueError, match=r"shape \[2, 2\] for a region of shape \[4, 2\]"):
        store.write_regions(STEP, [(lays["w"], ShardRegion((0, 0), (4, 2)), torch.ones(2, 2))])
    with pytest.raises(ValueError, match="does not fit the global shape"):
        store.read_region(STEP, "w", (3, 0), (2, 2))


def test_a_stale_layout_is_refused(url):
    store = ZarrStore(url)
    _save(store, {"w": torch.ones(4)})
    stale = array_layout("w", "float32", (6,), [ShardRegion((0,), (6,))])
    with pytest.raises(IntegrityError, match=r"stored array is float32\[4\], layout expects float32\[6\]"):
        store.write_regions(STEP, [(stale, ShardRegion((0,), (6,)), torch.ones(6))])


# ---------------------------------------------------------------- small objects
@pytest.mark.parametrize("kind", ["file", "memory"])
def test_objects_listing_and_prefix_deletion(url, kind):
    store = ZarrStore(url if kind == "file" else "memory://")
    for step in ("step-000000001", "step-000000010"):
        store.write_bytes(f"{step}/blobs/rank-00000.json", b"{}")
        store.write_bytes(f"{step}/manifest.json", step.encode())
    assert store.read_bytes("step-000000010/manifest.json") == b"step-000000010"
    assert store.exists("step-000000001/manifest.json") and not store.exists("step-000000001/nothing")
    assert not store.exists("step-000000001")  # a directory is not an object
    assert [n.rstrip("/") for n in store.list_dir("")] == ["step-000000001", "step-000000010"]
    assert store.list_dir("step-000000001") == ["blobs/", "manifest.json"]
    assert store.list_dir("step-000000099") == []
    store.delete_prefix("step-000000001/manifest.json")
    assert not store.exists("step-000000001/manifest.json") and store.exists("step-000000001/blobs/rank-00000.json")
    store.delete_prefix("step-00000000")  # a name prefix is not a directory: deletes nothing
    store.delete_prefix("step-000000001")
    assert [n.rstrip("/") for n in store.list_dir("")] == ["step-000000010"]
    assert store.read_bytes("step-000000010/blobs/rank-00000.json") == b"{}"
    with pytest.raises(ValueError, match="empty prefix"):
        store.delete_prefix("")


def test_memory_kvstore_holds_a_whole_step(tmp_path):
    store = ZarrStore("memory://", compression="zstd")
    t = torch.randn(9, 3).to(torch.bfloat16)
    _save(store, {"a/b": t})
    assert torch.equal(store.read_region(STEP, "a/b", (2, 0), (4, 3)), t[2:6])
    assert store.read_layout(STEP, "a/b").storage_dtype == "uint16"


class _Recorder(FaultInjector):
    """Records every operation announced to it (an injector that never fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[str, ...], str]] = []

    def on_op(self, op: str, *paths: str, when: str = "before") -> None:
        self.calls.append((op, paths, when))
        super().on_op(op, *paths, when=when)

    def fsynced(self) -> set[str]:
        return {os.path.normpath(p[0]) for op, p, when in self.calls if op == "fsync_dir" and when == "after"}


def test_writes_fsync_every_directory_up_to_the_root(url, root):
    """tensorstore fsyncs a file and its parent; the store fsyncs the directories above,
    through its injected file system (the seam a FaultyFS plugs into)."""
    rec = _Recorder()
    store = ZarrStore(url, fs=FaultyFS(rec), faults=rec)
    lays = _save(store, {"m/w": torch.ones(4, 4)})
    rec.calls.clear()
    store.write_regions(STEP, [(lays["m/w"], ShardRegion((0, 0), (4, 4)), torch.full((4, 4), 2.0))])
    synced = rec.fsynced()
    for d in ("", STEP, f"{STEP}/m", f"{STEP}/{array_path('m/w')}", f"{STEP}/{array_path('m/w')}/c"):
        assert os.path.normpath(os.path.join(root, d)) in synced, d
    # the write was announced before the directories were synced, and completed after
    ops = [(op, when) for op, _, when in rec.calls]
    assert ops[0] == ("kv_write", "before") and ops[-1] == ("kv_write", "after")
    rec.calls.clear()
    store.write_bytes(f"{STEP}/blobs/rank-00000.json", b"{}")
    assert {os.path.join(root, STEP), os.path.normpath(root)} <= rec.fsynced()


@pytest.mark.parametrize(
    "fault,errno_",
    [
        (lambda f: f.fsync_fails(), errno.EIO),
        (lambda f: f.read_only(), errno.EROFS),
        (lambda f: f.no_space(path_contains="blobs"), errno.ENOSPC),
    ],
    ids=["fsync", "erofs", "enospc"],
)
def test_a_failed_write_or_fsync_is_an_error_never_a_silent_success(url, fault, errno_):
    """A failed directory fsync reaches the store through its file system, EROFS and ENOSPC
    through its kvstore seam: each one fails the write call that met it."""
    faults = FaultInjector()
    store = ZarrStore(url, fs=FaultyFS(faults), faults=faults)
    store.write_bytes(f"{STEP}/x", b"ok")
    fault(faults)
    with pytest.raises(OSError) as info:
        store.write_bytes(f"{STEP}/blobs/rank-00000.json", b"{}")
    assert info.value.errno == errno_ and faults.fired == 1
    faults.disarm()
    assert store.read_bytes(f"{STEP}/x") == b"ok"


def test_raw_bytes_arrays_hold_objects_zarr_python_can_read(url, root):
    """Blobs and manifests are uint8 arrays whose one chunk is the object: the chunk is
    written before the array's zarr.json, and a chunk of the wrong length is damage."""
    zarr = pytest.importorskip("zarr")
    store = ZarrStore(url)
    store.write_bytes_array(f"{STEP}/.recoverkit/manifest", b'{"x": 1}')
    assert store.read_bytes_array(f"{STEP}/.recoverkit/manifest") == b'{"x": 1}'
    assert store.bytes_array_size(f"{STEP}/.recoverkit/manifest") == 8
    assert store.bytes_array_size(f"{STEP}/.recoverkit/none") is None
    assert bytes(zarr.open_array(os.path.join(root, STEP, ".recoverkit", "manifest"), mode="r")[...]) == b'{"x": 1}'
    store.write_bytes_array(f"{STEP}/empty", b"")
    assert store.read_bytes_array(f"{STEP}/empty") == b""
    with open(os.path.join(root, STEP, ".recoverkit", "manifest", "c", "0"), "ab") as f:
        f.write(b"!")
    with pytest.raises(IntegrityError, match="chunk c/0 is 9 bytes, the array's shape says 8"):
        store.read_bytes_array(f"{STEP}/.recoverkit/manifest")
    with pytest.raises(CheckpointNotFoundError):
        store.read_bytes_array(f"{STEP}/nothing")


def test_a_key_that_is_also_a_group_is_read_from_its_renamed_array(url):
    """Tensors ``a`` and ``a/b``: the array of ``a`` is ``a~``; read_layout finds it from the
    key alone (the natural path is a group), and a path that holds another key is refused."""
    from recoverkit.format.zarr_layout import array_paths

    store = ZarrStore(url)
    tensors = {"a": torch.arange(4.0), "a/b": torch.arange(2.0)}
    paths = array_paths(tensors)
    lays = {k: array_layout(k, "float32", tuple(t.shape), [ShardRegion((0,), tuple(t.shape))], path=paths[k]) for k, t in tensors.items()}
    store.create_step(STEP, list(lays.values()), {})
    store.write_regions(STEP, [(lays[k], ShardRegion((0,), tuple(t.shape)), t) for k, t in tensors.items()])
    assert store.read_layout(STEP, "a").path == "a~"
    assert torch.equal(store.read_region(STEP, "a", (0,), (4,)), tensors["a"])
    assert torch.equal(store.read_region(STEP, "a/b", (0,), (2,), path="a/b"), tensors["a/b"])
    with pytest.raises(IntegrityError, match="holds tensor 'a/b', expected 'a'"):
        store.read_layout(STEP, "a", path="a/b")
    with pytest.raises(ValueError, match="both the array"):
        store.create_step("step-000000009", [array_layout("a", "float32", (1,), [ShardRegion((0,), (1,))]),
                                             array_layout("a/b", "float32", (1,), [ShardRegion((0,), (1,))])], {})
