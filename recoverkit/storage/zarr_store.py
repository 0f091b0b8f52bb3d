"""Zarr v3 groups and arrays in any tensorstore kvstore: the I/O half of the persistent tier.

:class:`ZarrStore` knows nothing about commits or manifests (``zarr_tier.py`` does); it
creates a step's group and arrays, writes shard regions, reads regions straight into
caller memory, and moves small objects (blobs, manifests: plain objects, or raw-bytes uint8
arrays with :meth:`ZarrStore.write_bytes_array`). The layout itself (names, dtypes, chunk
grids, array JSON) is ``format/zarr_layout.py``; every array is addressed by its path in
the step (``ArrayLayout.path``, or the ``path`` a manifest recorded).

Codecs of every array: ``bytes`` (little endian) -> optional ``zstd`` or ``blosc`` ->
``crc32c`` (always). A chunk whose bytes were damaged fails tensorstore's crc32c check
and is reported as :class:`~recoverkit.errors.IntegrityError` naming the URL, the array
and the chunk.

**Durability** (``file://``). tensorstore's file kvstore writes each key to
``<key>.__lock``, ``fsync``s it, renames it into place and ``fsync``s the parent
directory when the context resource ``file_io_sync`` is true, which is its default and
which this store sets explicitly. It does not ``fsync`` the directories it creates on the
way (``step-N/``, ``model/<array>/c/0/``) in *their* parents, and ``delete_range`` does
not ``fsync`` at all. So after every write and delete this store ``fsync``s the affected
directories up to the root itself: when a write call returns, the data and every
directory entry leading to it are durable. Other kvstores (``gs://``, ``s3://``) make an
object durable when its write completes.

**The I/O seam** (faults as data). tensorstore does the object I/O itself, so it cannot be
routed through a :class:`~recoverkit.storage.fs.LocalFS`. Instead every kvstore operation
this store makes is announced to an injected
:class:`~recoverkit.storage.faults.FaultInjector` before and after it runs, as the
operation ``kv_write``, ``kv_read``, ``kv_list`` or ``kv_delete`` on its key (an array's
path for region reads and writes); and every operation this store makes on a local
directory itself (the ``fsync`` of directories, ``lstat``, listing, deletion) goes through
an injected ``LocalFS``. A test passes ``faults=`` and ``fs=FaultyFS(faults)`` to fail or
kill the process at any of them, on any kvstore.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import tensorstore as ts
import torch

from ..errors import (
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    RecoverkitError,
    StorageError,
)
from ..format.dtypes import dtype_from_name, dtype_name, from_bytes, to_bytes_view
from ..format.zarr_layout import (
    ArrayLayout,
    ShardRegion,
    array_path,
    bytes_array_metadata,
    group_metadata,
    group_paths,
)
from .faults import FaultInjector
from .fs import LocalFS

__all__ = ["ZarrStore", "COMPRESSIONS"]

#: Accepted ``compression`` values ("none" is the same as None).
COMPRESSIONS = (None, "none", "zstd", "blosc")
_ZARR_JSON = "zarr.json"
_QUOTED = re.compile(r'"([^"]+)"')
_MAX_OPEN_HANDLES = 1024


class ZarrStore:
    """A tensorstore kvstore holding recoverkit zarr v3 step groups.

    Args:
        url: a tensorstore kvstore URL (``file:///ckpt/zarr``, ``gs://bucket/run``,
            ``memory://``); keys below are relative to it.
        compression: None (or ``"none"``), ``"zstd"`` or ``"blosc"`` (lz4 with byte shuffle).
        level: the zstd level or blosc ``clevel``.
        context: extra tensorstore context resources (``file_io_sync`` is always true).
        fs: the operations on local directories (``file://`` stores): fsync, lstat, listing,
            deletion (inject a ``FaultyFS`` to fail them).
        faults: told of every kvstore operation before and after it runs (see the module
            docstring).

    Example:
        >>> import tempfile
        >>> store = ZarrStore("file://" + tempfile.mkdtemp())
        >>> store.write_bytes("step-000000001/blobs/x", b"hi"); store.read_bytes("step-000000001/blobs/x")
        b'hi'
    """

    def __init__(
        self, url: str, *, compression: str | None = None, level: int = 1, context: Mapping[str, Any] | None = None,
        fs: LocalFS | None = None, faults: FaultInjector | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if not isinstance(level, int) or isinstance(level, bool):
            raise ConfigError(f"compression level must be an integer, got {level!r}")
        self.compression = None if compression == "none" else compression
        self.level = level
        self.fs = fs if fs is not None else LocalFS()
        self.faults = faults if faults is not None else FaultInjector()
        self.url = url.rstrip("/") if url.rstrip("/").split("://", 1)[-1] else url
        spec = {"cache_pool": {"total_bytes_limit": 0}, **dict(context or {}), "file_io_sync": True}
        self._ctx = ts.Context(spec)
        try:
            kv = ts.KvStore.open(url, context=self._ctx).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError for every status
            raise StorageError(f"{url}: cannot open as a tensorstore kvstore: {e}") from e
        if kv.path and not kv.path.endswith("/"):
            kv.path = kv.path + "/"
        self._kv = kv
        self._local = _local_root(url, kv)
        self._handles: dict[tuple[str, str, str | None], tuple[ts.TensorStore, ArrayLayout, set[str] | None]] = {}

    # ------------------------------------------------------------------ arrays
    def create_step(
        self, step_dir: str, layouts: Sequence[ArrayLayout] | Mapping[str, ArrayLayout], attrs: Mapping[str, Any],
        *, groups: Sequence[str] = (),
    ) -> None:
        """Create the step group, every group on the way to an array (and ``groups``), and
        one array per layout (empty), each at its ``path``.

        Raises:
            ValueError: two layouts share an array path, or a path is both an array and a group.
            StorageError: the store refused a write.
        """
        lays = list(layouts.values()) if isinstance(layouts, Mapping) else list(layouts)
        paths: dict[str, str] = {}
        for lay in lays:
            other = paths.setdefault(lay.path, lay.key)
            if other != lay.key:
                raise ValueError(f"{self.url}/{step_dir}: keys {other!r} and {lay.key!r} map to the same array {lay.path}")
        nested = group_paths([*paths, *(f"{g}/x" for g in groups)])
        for path in sorted(nested & set(paths)):
            raise ValueError(f"{self.url}/{step_dir}: {path} would be both the array of {paths[path]!r} and a group")
        self._evict(step_dir)
        self._write_json(f"{step_dir}/{_ZARR_JSON}", group_metadata(attrs))
        for g in sorted(nested):
            self._write_json(f"{step_dir}/{g}/{_ZARR_JSON}", group_metadata())
        keys = [f"{step_dir.strip('/')}/{lay.path}" for lay in lays]
        for key in keys:
            self.faults.on_op("kv_write", key)
        futures = [
            (lay, ts.open(self._array_spec(lay.zarr_metadata(self._codecs(lay))), kvstore=self._array_kv(step_dir, lay.path), create=True, context=self._ctx))
            for lay in lays
        ]
        for lay, fut in futures:
            self._wait(fut, self._where(step_dir, lay.key, lay.path))
        self._sync(step_dir)
        for key in keys:
            self.faults.on_op("kv_write", key, when="after")

    def write_group(self, path: str, attrs: Mapping[str, Any] | None = None) -> None:
        """Write a group's ``zarr.json`` at ``path`` ("" = the store root), durably."""
        self.write_bytes(f"{path.strip('/')}/{_ZARR_JSON}".lstrip("/"), json.dumps(group_metadata(attrs), indent=2).encode("utf-8"))

    def read_layout(self, step_dir: str, key: str, path: str | None = None) -> ArrayLayout:
        """The layout of ``key``'s array as stored at ``path`` (default: its natural path, or
        that path with ``~`` appended where the natural one is a group).

        Raises:
            CheckpointNotFoundError: no array there.
            IntegrityError: the node is not valid JSON or holds another tensor.
        """
        if path is None:
            path = array_path(key)
            meta = self._read_meta(step_dir, path)
            if meta.get("node_type") == "group":
                path = f"{path}~"
                meta = self._read_meta(step_dir, path)
        else:
            meta = self._read_meta(step_dir, path)
        where = f"{self.url}/{step_dir}/{path}/{_ZARR_JSON}"
        layout = ArrayLayout.from_zarr_metadata(meta, where=where, path=path)
        if layout.key != key:
            raise IntegrityError(f"{where}: array holds tensor {layout.key!r}, expected {key!r}", path=where)
        return layout

    def _read_meta(self, step_dir: str, path: str) -> dict[str, Any]:
        where = f"{self.url}/{step_dir}/{path}/{_ZARR_JSON}"
        try:
            meta = json.loads(self.read_bytes(f"{step_dir}/{path}/{_ZARR_JSON}"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{where}: array metadata is not valid JSON ({e})", path=where) from e
        if not isinstance(meta, dict):
            raise IntegrityError(f"{where}: array metadata is not a JSON object", path=where)
        return meta

    def write_regions(self, step_dir: str, items: Iterable[tuple[ArrayLayout, ShardRegion, torch.Tensor]]) -> None:
        """Write each tensor into its region of its array; durable when this returns.

        Each tensor must have the layout's logical dtype and the region's shape and be a
        CPU tensor. Regions are written concurrently; with a chunk grid aligned to the
        shards each touches only its own chunks.

        Raises:
            ValueError: a tensor does not match its layout or region.
            IntegrityError: the stored array differs from the layout given.
            StorageError / CheckpointNotFoundError: the store failed or the array is missing.
        """
        items = list(items)
        handles = self._open_all(step_dir, {lay.key: lay for lay, _, _ in items})
        keys = sorted({f"{step_dir.strip('/')}/{lay.path}" for lay, _, _ in items})
        for key in keys:
            self.faults.on_op("kv_write", key)
        pending = []
        for lay, region, tensor in items:
            where = self._where(step_dir, lay.key, lay.path)
            _check_tensor(tensor, lay, region, where)
            if region.numel == 0:
                continue
            src = _numpy_view(tensor.contiguous(), lay, region.shape)
            pending.append((where, handles[lay.key][_slices(region)].write(src)))
        for where, fut in pending:
            self._wait(fut.commit, where)
        for key in keys:
            self._sync(key)
        for key in keys:
            self.faults.on_op("kv_write", key, when="after")

    def read_region(
        self, step_dir: str, key: str, offsets: Sequence[int], shape: Sequence[int], *,
        out: torch.Tensor | None = None, path: str | None = None,
    ) -> torch.Tensor:
        """Read a region of ``key``'s array (at ``path``, as :meth:`read_layout` resolves it)
        into ``out`` (or a new tensor) and return it.

        ``out`` must be a contiguous CPU tensor of the logical dtype and the region's shape;
        chunks are decoded straight into its memory (no intermediate full copy).

        Raises:
            CheckpointNotFoundError: the array is missing.
            IntegrityError: a chunk fails its crc32c, or a chunk the region needs is missing.
            ValueError: the region or ``out`` does not match the array.
        """
        handle, layout, chunks = self._reader(step_dir, key, path)
        where = self._where(step_dir, key, layout.path)
        region = ShardRegion(tuple(offsets), tuple(shape))
        region.check_within(layout.shape, where)
        if out is None:
            out = from_bytes(torch.empty(region.numel * layout.itemsize, dtype=torch.uint8), dtype_from_name(layout.dtype), region.shape)
        _check_tensor(out, layout, region, where)
        if not out.is_contiguous():
            raise ValueError(f"{where}: read_region needs a contiguous out tensor")
        if region.numel == 0:
            return out
        if chunks is not None:
            _check_chunks_present(chunks, layout, region, where)
        key = f"{step_dir.strip('/')}/{layout.path}"
        self.faults.on_op("kv_read", key)
        target = ts.array(_numpy_view(out, layout, region.shape), copy=False, write=True, context=self._ctx)
        self._wait(target.write(handle[_slices(region)]).commit, where)
        self.faults.on_op("kv_read", key, when="after")
        return out

    # ------------------------------------------------------------- small objects
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically and durably (replacing any previous value)."""
        self.faults.on_op("kv_write", key)
        self._wait(self._kv.write(key, bytes(data)), f"{self.url}/{key}")
        if self._local is not None:  # tensorstore fsynced the parent; its parents are ours
            self._fsync_up(os.path.dirname(os.path.join(self._local, key.strip("/"))))
        self.faults.on_op("kv_write", key, when="after")

    def write_bytes_array(
        self, path: str, data: bytes, attrs: Mapping[str, Any] | None = None, *, before_publish: Callable[[], None] | None = None
    ) -> None:
        """Store ``data`` as a uint8 zarr array at ``path`` whose one chunk ``c/0`` is the raw
        bytes: the chunk first, the array's ``zarr.json`` last (so the node exists only once
        its bytes are durable; its ``zarr.json`` write is the atomic commit point).
        ``before_publish`` is called between the two (the bytes durable, the node absent)."""
        path = path.strip("/")
        if data:
            self.write_bytes(f"{path}/c/0", data)
        if before_publish is not None:
            before_publish()
        self.write_bytes(f"{path}/{_ZARR_JSON}", json.dumps(bytes_array_metadata(len(data), attrs), indent=2).encode("utf-8"))

    def bytes_array_size(self, path: str) -> int | None:
        """The length of the raw-bytes array at ``path`` as stored (its chunk), None if absent."""
        if self.size(f"{path.strip('/')}/{_ZARR_JSON}") is None:
            return None
        return self.size(f"{path.strip('/')}/c/0") or 0

    def read_bytes_array(self, path: str) -> bytes:
        """The bytes of the array :meth:`write_bytes_array` wrote at ``path``.

        Raises:
            CheckpointNotFoundError: no array there.
            IntegrityError: not a raw-bytes array, or its chunk is not as long as its shape.
        """
        path = path.strip("/")
        where = f"{self.url}/{path}"
        try:
            meta = json.loads(self.read_bytes(f"{path}/{_ZARR_JSON}"))
            n = meta["shape"][0]
            ok = isinstance(n, int) and not isinstance(n, bool) and meta == bytes_array_metadata(n, meta.get("attributes"))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise IntegrityError(f"{where}: not a raw-bytes array ({e!r})", path=where) from e
        if not ok:
            raise IntegrityError(f"{where}: not a raw-bytes uint8 array with one chunk", path=where)
        chunk = f"{path}/c/0"
        if self._local is not None:  # a stat bounds the read before any byte of it is held
            found = self.size(chunk) or 0
            if found != n:
                raise IntegrityError(f"{where}: chunk c/0 is {found} bytes, the array's shape says {n}", path=where)
        data = self.read_bytes(chunk) if n else b""
        if len(data) != n:
            raise IntegrityError(f"{where}: chunk c/0 is {len(data)} bytes, the array's shape says {n}", path=where)
        return data

    def read_bytes(self, key: str) -> bytes:
        """One object's bytes; raises CheckpointNotFoundError if it does not exist (and, on a
        local store, IntegrityError if it is not a regular file: no FIFO is waited on)."""
        if self._local is not None:
            self.size(key)  # lstat only; elsewhere size() would read the object a second time
        result = self._read(key)
        if result.state != "value":
            raise CheckpointNotFoundError(f"{self.url}/{key}: no such object")
        return bytes(result.value)

    def _read(self, key: str, **kwargs: Any) -> Any:
        self.faults.on_op("kv_read", key)
        result = self._wait(self._kv.read(key, **kwargs), f"{self.url}/{key}")
        self.faults.on_op("kv_read", key, when="after")
        return result

    def size(self, key: str) -> int | None:
        """The size of the object ``key`` in bytes, or None if there is none.

        On a local store nothing is opened: a symlink, FIFO or other special file under the
        key raises IntegrityError. Elsewhere the object is read (blobs are small).
        """
        if self._local is not None:
            return self.fs.size(os.path.join(self._local, key.strip("/")))
        result = self._read(key)
        return len(result.value) if result.state == "value" else None

    def exists(self, key: str) -> bool:
        """Whether an object is stored under exactly ``key``."""
        if self._local is not None:
            return self.fs.is_file(os.path.join(self._local, key))
        return self._read(key, byte_range=slice(0, 0)).state == "value"

    def list_dir(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` ("" = the root), sorted; sub-directories end in "/"."""
        prefix = prefix.strip("/")
        if self._local is not None:
            path = os.path.join(self._local, prefix)
            try:
                names = self.fs.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(n + "/" if self.fs.is_dir(os.path.join(path, n)) else n for n in names if not n.endswith(".__lock"))
        base = f"{prefix}/" if prefix else ""
        keys = self._list(_prefix_range(base), base)
        heads: set[str] = set()
        for k in keys:
            head, sep, _ = k.decode("utf-8").partition("/")
            heads.add(head + sep)
        return sorted(heads)

    def delete_prefix(self, prefix: str) -> None:
        """Delete the object ``prefix`` and everything under ``prefix/`` (durably).

        ``prefix`` is a path, not a name prefix: ``step-1`` never deletes ``step-10``.
        """
        prefix = prefix.strip("/")
        if not prefix:
            raise ValueError(f"{self.url}: refusing to delete the whole store (empty prefix)")
        self._evict(prefix)
        self.faults.on_op("kv_delete", prefix)
        if self._local is None:
            self._wait(self._kv.write(prefix, None), f"{self.url}/{prefix}")
            self._wait(self._kv.delete_range(_prefix_range(prefix + "/")), f"{self.url}/{prefix}/")
        else:
            path = os.path.join(self._local, prefix)
            try:  # tensorstore's delete_range neither fsyncs nor removes the top directory
                self.fs.remove_tree(path)  # a symlink is unlinked, never followed
            except OSError as e:
                raise StorageError(f"{self.url}/{prefix}: cannot delete: {e}") from e
            self._fsync_up(os.path.dirname(path))
        self.faults.on_op("kv_delete", prefix, when="after")

    def close(self) -> None:
        """Drop open array handles (the store stays usable; they reopen on demand)."""
        self._handles.clear()

    def __enter__(self) -> ZarrStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- helpers
    def _codecs(self, layout: ArrayLayout) -> list[dict[str, Any]]:
        codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.compression == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": self.level, "checksum": False}})
        elif self.compression == "blosc":
            size = layout.itemsize
            shuffle = "shuffle" if size > 1 else "noshuffle"
            codecs.append({"name": "blosc", "configuration": {"cname": "lz4", "clevel": self.level, "shuffle": shuffle, "typesize": size, "blocksize": 0}})
        codecs.append({"name": "crc32c"})
        return codecs

    @staticmethod
    def _array_spec(metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"driver": "zarr3", "store_data_equal_to_fill_value": True}
        if metadata is not None:
            spec["metadata"] = dict(metadata)
        return spec

    def _array_kv(self, step_dir: str, path: str) -> ts.KvStore:
        kv = self._kv.copy() if hasattr(self._kv, "copy") else self._kv
        kv.path = f"{self._kv.path}{step_dir.strip('/')}/{path}/"
        return kv

    def _where(self, step_dir: str, key: str, path: str) -> str:
        return f"{self.url}/{step_dir.strip('/')}/{path} (tensor {key!r})"

    def _open_all(self, step_dir: str, layouts: Mapping[str, ArrayLayout]) -> dict[str, ts.TensorStore]:
        """Open every array for writing (concurrently) and check it matches its layout."""
        futures = {k: ts.open(self._array_spec(), kvstore=self._array_kv(step_dir, lay.path), open=True, context=self._ctx) for k, lay in layouts.items()}
        out = {}
        for k, fut in futures.items():
            where = self._where(step_dir, k, layouts[k].path)
            handle = self._wait(fut, where)
            _check_handle(handle, layouts[k], where)
            out[k] = handle
        return out

    def _reader(self, step_dir: str, key: str, path: str | None) -> tuple[ts.TensorStore, ArrayLayout, set[str] | None]:
        """A cached read handle, its layout and (local stores) the chunk keys present."""
        cache_key = (step_dir.strip("/"), key, path)
        hit = self._handles.get(cache_key)
        if hit is not None:
            return hit
        layout = self.read_layout(step_dir, key, path)
        where = self._where(step_dir, key, layout.path)
        handle = self._wait(ts.open(self._array_spec(), kvstore=self._array_kv(step_dir, layout.path), open=True, read=True, context=self._ctx), where)
        _check_handle(handle, layout, where)
        chunks = self._chunk_keys(f"{step_dir.strip('/')}/{layout.path}/c")
        if len(self._handles) >= _MAX_OPEN_HANDLES:
            self._handles.pop(next(iter(self._handles)))
        self._handles[cache_key] = (handle, layout, chunks)
        return self._handles[cache_key]

    def _chunk_keys(self, prefix: str) -> set[str]:
        """Every chunk key stored under ``prefix`` (``c``, ``c/0/1``...), relative to the array."""
        base = prefix.rsplit("/", 1)[0] + "/"
        keys = self._list(_prefix_range(prefix), base)
        return {k.decode("utf-8") for k in keys if not k.endswith(b".__lock")}

    def _evict(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        for k in [k for k in self._handles if k[0] == prefix or k[0].startswith(prefix + "/")]:
            del self._handles[k]

    def _write_json(self, key: str, obj: Any) -> None:
        self.faults.on_op("kv_write", key)
        self._wait(self._kv.write(key, json.dumps(obj, indent=2).encode("utf-8")), f"{self.url}/{key}")
        self.faults.on_op("kv_write", key, when="after")

    def _list(self, keys: ts.KvStore.KeyRange, base: str) -> Any:
        """The keys in the range, ``base`` stripped from each."""
        self.faults.on_op("kv_list", base)
        out = self._wait(self._kv.list(keys, strip_prefix_length=len(base.encode())), f"{self.url}/{base}")
        self.faults.on_op("kv_list", base, when="after")
        return out

    def _wait(self, future: Any, where: str) -> Any:
        """``future.result()`` with tensorstore's errors turned into recoverkit errors."""
        try:
            return future.result()
        except RecoverkitError:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError for every status
            raise _translate(e, where) from e

    def _sync(self, sub: str) -> None:
        """fsync every directory under ``sub`` and its parents up to the root (file kvstore only)."""
        if self._local is None:
            return
        top = os.path.join(self._local, sub.strip("/"))
        if self.fs.is_dir(top, follow_symlinks=not sub.strip("/")):  # the root may be a symlink
            for d, _, _ in os.walk(top, topdown=False):
                self.fs.fsync_dir(d)
        self._fsync_up(os.path.dirname(top.rstrip("/")) if sub.strip("/") else top)

    def _fsync_up(self, path: str) -> None:
        """fsync ``path`` and each parent up to and including the store's root."""
        assert self._local is not None
        root = os.path.normpath(self._local)
        path = os.path.normpath(path)
        while True:
            if self.fs.is_dir(path, follow_symlinks=path == root):  # the root may be a symlink
                self.fs.fsync_dir(path)
            if path == root or len(path) <= len(root):
                break
            path = os.path.dirname(path)


# --------------------------------------------------------------------- functions
def _local_root(url: str, kv: ts.KvStore) -> str | None:
    """The root directory of a plain ``file://`` store (None for any other kvstore)."""
    if "|" in url or urlparse(url).scheme != "file":
        return None
    return unquote(kv.path) or None


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """The key range of every key starting with ``prefix``."""
    full = prefix.encode("utf-8")
    stem = full.rstrip(b"\xff")
    if not stem:
        return ts.KvStore.KeyRange(inclusive_min=full)
    return ts.KvStore.KeyRange(inclusive_min=full, exclusive_max=stem[:-1] + bytes([stem[-1] + 1]))


def _slices(region: ShardRegion) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(region.offsets, region.shape))


def _numpy_view(t: torch.Tensor, layout: ArrayLayout, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy array sharing ``t``'s memory, typed as the layout's storage dtype."""
    raw = to_bytes_view(t).numpy()
    return raw.view(np.dtype(layout.storage_dtype)).reshape(shape)


def _check_tensor(t: torch.Tensor, layout: ArrayLayout, region: ShardRegion, where: str) -> None:
    region.check_within(layout.shape, where)
    if dtype_name(t.dtype) != layout.dtype:
        raise ValueError(f"{where}: tensor has dtype {dtype_name(t.dtype)}, the array stores {layout.dtype}")
    if tuple(t.shape) != region.shape:
        raise ValueError(f"{where}: tensor of shape {list(t.shape)} for a region of shape {list(region.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{where}: tensor is on {t.device}; the store reads and writes CPU tensors")


def _check_handle(handle: ts.TensorStore, layout: ArrayLayout, where: str) -> None:
    shape = tuple(int(n) for n in handle.shape)
    stored = str(handle.dtype.numpy_dtype)
    if shape != layout.shape or stored != layout.storage_dtype:
        raise IntegrityError(
            f"{where}: stored array is {stored}{list(shape)}, layout expects {layout.storage_dtype}{list(layout.shape)}",
            path=where,
        )


def _check_chunks_present(present: set[str], layout: ArrayLayout, region: ShardRegion, where: str) -> None:
    """Raise IntegrityError naming the first chunk the region needs that is not stored."""
    ranges = [range(o // c, -(-(o + s) // c)) for o, s, c in zip(region.offsets, region.shape, layout.chunks)]
    for idx in _product(ranges):
        name = "/".join(["c", *map(str, idx)])
        if name not in present:
            raise IntegrityError(f"{where}: chunk {name} is missing", path=f"{where}/{name}")


def _product(ranges: list[range]) -> Iterable[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for i in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (i, *rest)


def _translate(e: Exception, where: str) -> RecoverkitError:
    """A recoverkit error for a tensorstore failure (status code in the message)."""
    msg = str(e)
    code = msg.split(":", 1)[0].strip()
    if code == "DATA_LOSS":
        quoted = _QUOTED.search(msg)
        chunk = quoted.group(1) if quoted else "?"
        marker = "/c/"
        chunk = "c/" + chunk.split(marker, 1)[1] if marker in chunk else chunk
        return IntegrityError(f"{where}: chunk {chunk} is corrupt: {msg}", path=quoted.group(1) if quoted else None)
    if code == "NOT_FOUND":
        return CheckpointNotFoundError(f"{where}: not found: {msg}")
    return StorageError(f"{where}: {msg}")

