"""``--format torch``: one ``torch.save`` file of the consolidated state, loadable with
``torch.load(weights_only=True)``, written one tensor at a time.

The archive is first written by ``torch.save`` under ``torch.serialization.skip_data``
from a tree of placeholders: meta tensors (shapes and dtypes, no memory) that a pickler
hook (:class:`_PlaceholderPickler`) saves exactly as torch saves a CPU tensor (a storage
record of the right size, rebuilt on the CPU), which reserves every storage's place. The
file is then read back on the meta device, where each storage reports its offset in the
file, and every tensor's bytes are written there with ``pwrite``. The zip CRC-32 of each
record is patched in, so the file is a valid zip archive as well as a valid torch file.

Placeholders are plain meta tensors, not FakeTensors: creating a ``FakeTensorMode``
imports ``torch._dynamo`` (about a second and a half of start-up for any export).
"""

from __future__ import annotations

import os
import pickle
import struct
import types
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ...format.manifest import TensorRecord
from ...state import TensorLeaf, dtype_from_name, to_bytes_view
from .common import (
    ExportResult,
    Progress,
    Source,
    _leaf_records,
    _note,
    _pwrite_all,
    _read_full,
    _staged_file,
    consolidated_tree,
)


def export_torch(
    src: Source,
    out: str,
    *,
    rank: int = 0,
    select: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """One ``torch.save`` file of the consolidated state, written tensor by tensor."""
    tree, _ = consolidated_tree(src, rank=rank, select=select, allow_pickle=allow_pickle)
    records = _leaf_records(src, tree, rank)
    result = ExportResult(out, "torch", src.step)
    placeholders, sources = _placeholders(records, result)
    saved = _torch_tree(tree, placeholders, sources, result)
    with _staged_file(out, force) as tmp:
        with torch.serialization.skip_data(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(saved, tmp, pickle_module=_placeholder_pickle(sources))
        offsets = _storage_offsets(tmp, saved)
        _fill_archive(tmp, offsets, sources, src, result, progress)
    result.tensors = len({r.key for r in records.values()})
    return result


def _placeholders(records: dict[str, TensorRecord], result: ExportResult) -> tuple[dict[str, torch.Tensor], dict[int, Any]]:
    """One meta tensor per stored record (aliases share it); id(placeholder) -> the record it stands for."""
    placeholders: dict[str, torch.Tensor] = {}
    sources: dict[int, Any] = {}
    for rec in records.values():
        if rec.key not in placeholders:
            placeholders[rec.key] = torch.empty(rec.shape, dtype=dtype_from_name(rec.dtype), device="meta")
        sources[id(placeholders[rec.key])] = rec
    return {k: placeholders[r.key] for k, r in records.items()}, sources


class _PlaceholderPickler(pickle.Pickler):
    """Pickles a placeholder (a meta tensor standing for a stored record) the way torch
    pickles a contiguous CPU tensor: ``_rebuild_tensor_v2`` (``_v3`` for the dtypes
    without a typed storage) of a storage whose location is ``cpu``. Under ``skip_data``
    torch then records the storage's size and never touches its (absent) bytes."""

    placeholders: dict[int, Any] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor or id(obj) not in self.placeholders or obj.device.type != "meta":
            return NotImplemented
        untyped = obj.untyped_storage()
        hooks: OrderedDict[Any, Any] = OrderedDict()
        if obj.dtype in torch.storage._new_dtypes():
            untyped._fake_device = torch.device("cpu")  # type: ignore[attr-defined]
            return torch._utils._rebuild_tensor_v3, (untyped, 0, tuple(obj.shape), obj.stride(), False, hooks, obj.dtype)
        storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=obj.dtype, _internal=True)
        storage._fake_device = torch.device("cpu")  # type: ignore[attr-defined]
        return torch._utils._rebuild_tensor_v2, (storage, 0, tuple(obj.shape), obj.stride(), False, hooks)


def _placeholder_pickle(sources: dict[int, Any]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.save`` whose Pickler knows the placeholders in ``sources``."""
    module = types.ModuleType("recoverkit_placeholder_pickle")
    module.Pickler = type("Pickler", (_PlaceholderPickler,), {"placeholders": sources})  # type: ignore[attr-defined]
    return module


def _torch_tree(node: Any, placeholders: dict[str, torch.Tensor], sources: dict[int, Any], result: ExportResult) -> Any:
    """The tree to ``torch.save``: stored tensors become placeholders, and the few values
    ``torch.load(weights_only=True)`` refuses become the nearest type it accepts."""
    if isinstance(node, TensorLeaf):
        return placeholders[node.key]
    if isinstance(node, dict):
        items = [(k, _torch_tree(v, placeholders, sources, result)) for k, v in node.items()]
        out = type(node)(items) if type(node) is not dict and _rebuildable(node) else dict(items)
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(node, list):
        return [_torch_tree(v, placeholders, sources, result) for v in node]
    if isinstance(node, tuple):
        return tuple(_torch_tree(v, placeholders, sources, result) for v in node)
    if isinstance(node, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(node).copy())
        sources[id(t)] = t
        _note(result, "numpy arrays were stored as tensors")
        return t
    if isinstance(node, np.generic):
        _note(result, "numpy scalars were stored as Python scalars")
        return node.item()
    if isinstance(node, frozenset):
        _note(result, "frozensets were stored as sets")
        return set(node)
    if isinstance(node, (range, slice)):
        _note(result, "ranges and slices were stored as (start, stop, step) tuples")
        return (node.start, node.stop, node.step)
    return node


def _rebuildable(node: dict) -> bool:  # type: ignore[type-arg]
    try:
        type(node)()
        return True
    except TypeError:
        return False


def _storage_offsets(path: str, saved: Any) -> dict[int, int]:
    """File offset of every storage -> id of the tensor (placeholder or real) it belongs to.

    The archive is read back on the meta device (no data), where torch records each
    storage's offset in the file; each offset is checked against the zip directory.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = torch.load(path, map_location="meta", weights_only=True)
    records = _zip_data_records(path)
    found: dict[int, int] = {}
    for mine, theirs in _pair_tensors(saved, meta):
        nbytes = theirs.untyped_storage().nbytes()
        if nbytes == 0:
            continue
        offset = getattr(theirs.untyped_storage(), "_checkpoint_offset", None)
        if offset is None or records.get(offset, (None, -1))[1] != nbytes:
            raise RuntimeError(
                f"{path}: cannot locate the storage of a {list(mine.shape)} {mine.dtype} tensor in the "
                f"archive written by torch {torch.__version__}; use --format safetensors or dcp"
            )
        found.setdefault(offset, id(mine))
    return found


def _pair_tensors(a: Any, b: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Walk two trees of the same shape in step; yield the tensors at the same places."""
    if isinstance(a, torch.Tensor):
        yield a, b
    elif isinstance(a, dict):
        for k, v in a.items():
            yield from _pair_tensors(v, b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            yield from _pair_tensors(x, y)


def _zip_data_records(path: str) -> dict[int, tuple[zipfile.ZipInfo, int]]:
    """data offset -> (ZipInfo, size) for every record of the archive."""
    out: dict[int, tuple[zipfile.ZipInfo, int]] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out[info.header_offset + 30 + name_len + extra_len] = (info, info.file_size)
    return out


def _fill_archive(
    path: str, offsets: dict[int, int], sources: dict[int, Any], src: Source, result: ExportResult, progress: Progress | None
) -> None:
    """Write every storage's bytes at its offset and patch the zip CRC-32 of its record."""
    records = _zip_data_records(path)
    by_id = {id_: offset for offset, id_ in offsets.items()}
    crcs: dict[str, int] = {}
    fd = os.open(path, os.O_RDWR)
    try:
        for id_, offset in by_id.items():
            source = sources[id_]
            tensor = source if isinstance(source, torch.Tensor) else _read_full(src, source)
            data = to_bytes_view(tensor.contiguous()).numpy()
            _pwrite_all(fd, memoryview(data), offset)
            info = records[offset][0]
            crcs[info.filename] = zlib.crc32(memoryview(data))
            result.nbytes += data.nbytes
            if progress is not None:
                progress(data.nbytes)
            del tensor, data
        _patch_zip_crcs(fd, path, records, crcs)
        os.fsync(fd)
    finally:
        os.close(fd)


def _patch_zip_crcs(fd: int, path: str, records: dict[int, tuple[zipfile.ZipInfo, int]], crcs: dict[str, int]) -> None:
    """Put each filled record's CRC-32 where zip readers look: the central directory
    entry, and the data descriptor (or local header) of the record."""
    with zipfile.ZipFile(path) as zf:
        pos = zf.start_dir
        count = len(zf.infolist())
    for _ in range(count):
        head = os.pread(fd, 46, pos)
        if head[:4] != b"PK\x01\x02":
            raise RuntimeError(f"{path}: unexpected zip central directory layout")
        name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
        name = os.pread(fd, name_len, pos + 46).decode("utf-8")
        if name in crcs:
            os.pwrite(fd, struct.pack("<I", crcs[name]), pos + 16)
        pos += 46 + name_len + extra_len + comment_len
    for data_offset, (info, size) in records.items():
        if info.filename not in crcs:
            continue
        crc = struct.pack("<I", crcs[info.filename])
        if info.flag_bits & 0x08:  # a data descriptor follows the data
            sig = os.pread(fd, 4, data_offset + size)
            os.pwrite(fd, crc, data_offset + size + (4 if sig == b"PK\x07\x08" else 0))
        else:
            os.pwrite(fd, crc, info.header_offset + 14)
