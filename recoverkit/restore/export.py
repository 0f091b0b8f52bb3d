"""Materialize a committed step in another format, streaming one tensor at a time.

Formats:

* ``torch``: one ``torch.save`` file, loadable with ``torch.load(weights_only=True)``.
* ``safetensors``: one safetensors file with every tensor (tied tensors stored once).
* ``dcp``: a ``torch.distributed.checkpoint`` directory (``dcp.load`` in one process).
* ``recoverkit``: a recoverkit checkpoint root resharded for ``world_size`` ranks.

The consolidated formats hold one rank's view of the state (rank 0 by default): the object
tree that rank saved, with every tensor at its full global shape. Memory stays bounded by
the largest tensor, never the checkpoint: each tensor is assembled from its pieces with
:func:`recoverkit.restore.reader.read_region` (every piece CRC-checked), written out and
dropped before the next one is read.

How each writer streams:

* torch: the archive is first written by ``torch.save`` under
  ``torch.serialization.skip_data`` from a tree of FakeTensors (shapes and dtypes, no
  memory), which reserves every storage's place; the file is then read back on the meta
  device, where each storage reports its offset in the file, and every tensor's bytes are
  written there with ``pwrite``. The zip CRC-32 of each record is patched in, so the file is
  a valid zip archive as well as a valid torch file.
* safetensors: the header (names, dtypes, shapes, offsets) is known from the manifest, so
  it is written first and the tensors follow in order.
* dcp: ``FileSystemWriter(single_file_per_rank=False)`` (one file per item, so the writer
  never holds more than one tensor) with a planner whose ``resolve_data`` reads each tensor
  when DCP asks for it; the state handed to ``dcp.save`` holds meta tensors only.
* recoverkit: each output rank's segment is written region by region with ``pwrite``, then
  committed with the node-local tier's protocol (manifest last, atomic rename).

Every output is written under a temporary name next to the target and renamed into place
when complete, so an interrupted export never leaves a half-written file under its name.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import time
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..dist.sharded import local_prefix
from ..errors import IncompatibleCheckpointError
from ..format.checksum import crc32c
from ..format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord
from ..format.segment import plan_offsets, segment_name
from ..state import TensorLeaf, decode, dtype_from_name, to_bytes_view
from ..storage.base import ReadableTier
from ..storage.local import LocalTier
from ..storage.lock import RunLock
from .reader import read_region, resolve_record, tensor_leaves

__all__ = [
    "FORMATS",
    "Source",
    "ExportResult",
    "export",
    "export_torch",
    "export_safetensors",
    "export_dcp",
    "export_recoverkit",
    "consolidated_tree",
    "read_blob",
    "resolve_record",
]

FORMATS = ("recoverkit", "torch", "safetensors", "dcp")
Progress = Callable[[int], None]
Box = tuple[tuple[int, ...], tuple[int, ...]]

#: torch dtype name -> safetensors dtype name (the types safetensors can hold)
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}


@dataclass(frozen=True)
class Source:
    """A committed step to export: where it lives and its verified manifest."""

    tier: ReadableTier
    step: int
    manifest: Manifest


@dataclass
class ExportResult:
    """What an export wrote."""

    path: str
    format: str
    step: int
    tensors: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "step": self.step, "tensors": self.tensors,
                "nbytes": self.nbytes, "seconds": self.seconds, "notes": self.notes}


def export(
    src: Source,
    out: str,
    fmt: str,
    *,
    world_size: int | None = None,
    rank: int = 0,
    select: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``src`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    if fmt == "recoverkit":
        result = export_recoverkit(src, out, world_size or src.manifest.world_size, force=force, progress=progress)
    else:
        writer = {"torch": export_torch, "safetensors": export_safetensors, "dcp": export_dcp}[fmt]
        result = writer(src, out, rank=rank, select=select, allow_pickle=allow_pickle, force=force, progress=progress)
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- the tree
def consolidated_tree(
    src: Source, *, rank: int = 0, select: str | None = None, allow_pickle: bool = False
) -> tuple[Any, str]:
    """The decoded object tree of ``rank`` (tensors as :class:`TensorLeaf`), and its key prefix.

    ``select`` names a top-level entry (``"model"``) and returns only its subtree; the
    prefix (``"model/"``) is what its tensor keys start with.
    """
    tree = decode(read_blob(src, rank), allow_pickle=allow_pickle)
    if select is None:
        return tree, ""
    if not isinstance(tree, dict) or select not in tree:
        have = ", ".join(repr(k) for k in tree) if isinstance(tree, dict) else "none"
        raise IncompatibleCheckpointError(f"step {src.step} has no entry {select!r} (entries: {have})")
    return tree[select], f"{select}/"


def read_blob(src: Source, rank: int = 0) -> bytes:
    """Rank ``rank``'s encoded object tree (typed JSON), checksum verified."""
    blobs = {b.rank: b for b in src.manifest.blobs}
    if rank not in blobs:
        raise IncompatibleCheckpointError(
            f"step {src.step} was saved by {src.manifest.world_size} rank(s); it has no rank {rank}"
        )
    rec = blobs[rank]
    buf = bytearray(rec.nbytes)
    src.tier.read(src.step, [(rec, _address(buf))])
    return bytes(buf)


def _read_full(src: Source, rec: TensorRecord) -> torch.Tensor:
    """The whole tensor of ``rec``, every piece verified."""
    return read_region(src.tier, src.step, rec, ((0,) * len(rec.shape), rec.shape))


def _leaf_records(src: Source, tree: Any, rank: int) -> dict[str, TensorRecord]:
    """Leaf key -> the record holding its bytes, in tree order."""
    return {key: resolve_record(src.manifest, key, rank) for key in dict.fromkeys(tensor_leaves(tree))}


# --------------------------------------------------------------------------- torch
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
    fakes, sources = _placeholders(records, result)
    saved = _torch_tree(tree, fakes, sources, result)
    with _staged_file(out, force) as tmp:
        with torch.serialization.skip_data(materialize_fake_tensors=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(saved, tmp)
        offsets = _storage_offsets(tmp, saved)
        _fill_archive(tmp, offsets, sources, src, result, progress)
    result.tensors = len({r.key for r in records.values()})
    return result


def _placeholders(records: dict[str, TensorRecord], result: ExportResult) -> tuple[dict[str, torch.Tensor], dict[int, Any]]:
    """One FakeTensor per stored record (aliases share it); id(fake) -> the record it stands for."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fakes: dict[str, torch.Tensor] = {}
    sources: dict[int, Any] = {}
    with FakeTensorMode():
        for rec in records.values():
            if rec.key not in fakes:
                fakes[rec.key] = torch.empty(rec.shape, dtype=dtype_from_name(rec.dtype))
            sources[id(fakes[rec.key])] = rec
    return {k: fakes[r.key] for k, r in records.items()}, sources


def _torch_tree(node: Any, fakes: dict[str, torch.Tensor], sources: dict[int, Any], result: ExportResult) -> Any:
    """The tree to ``torch.save``: placeholders become FakeTensors, and the few values
    ``torch.load(weights_only=True)`` refuses become the nearest type it accepts."""
    if isinstance(node, TensorLeaf):
        return fakes[node.key]
    if isinstance(node, dict):
        items = [(k, _torch_tree(v, fakes, sources, result)) for k, v in node.items()]
        out = type(node)(items) if type(node) is not dict and _rebuildable(node) else dict(items)
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(node, list):
        return [_torch_tree(v, fakes, sources, result) for v in node]
    if isinstance(node, tuple):
        return tuple(_torch_tree(v, fakes, sources, result) for v in node)
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


def _note(result: ExportResult, text: str) -> None:
    if text not in result.notes:
        result.notes.append(text)


def _storage_offsets(path: str, saved: Any) -> dict[int, int]:
    """File offset of every storage -> id of the tensor (fake or real) it belongs to.

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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + (1 << 30)], offset + done)


# --------------------------------------------------------------------------- safetensors
def export_safetensors(
    src: Source,
    out: str,
    *,
    rank: int = 0,
    select: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """One safetensors file of every tensor of the consolidated state (names: keys without
    the ``select`` prefix); a tensor tied to another is stored once, its other names are
    listed in the ``recoverkit.aliases`` metadata (JSON name -> stored name)."""
    tree, prefix = consolidated_tree(src, rank=rank, select=select, allow_pickle=allow_pickle)
    records = _leaf_records(src, tree, rank)
    result = ExportResult(out, "safetensors", src.step)
    stored: dict[str, tuple[str, TensorRecord]] = {}  # record key -> (name, record)
    aliases: dict[str, str] = {}
    for key, rec in records.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if rec.key in stored:
            aliases[name] = stored[rec.key][0]
            continue
        if rec.dtype not in SAFETENSORS_DTYPES:
            raise IncompatibleCheckpointError(
                f"tensor {key!r} has dtype {rec.dtype}, which safetensors cannot hold; "
                "use --format torch or dcp, or --select an entry without it"
            )
        stored[rec.key] = (name, rec)
    header, order = _safetensors_header(stored, aliases, src)
    with _staged_file(out, force) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for rec in order:
            tensor = _read_full(src, rec)
            data = to_bytes_view(tensor).numpy()
            f.write(memoryview(data))
            result.nbytes += data.nbytes
            if progress is not None:
                progress(data.nbytes)
            del tensor, data
        f.flush()
        os.fsync(f.fileno())
    result.tensors = len(order)
    if aliases:
        _note(result, f"{len(aliases)} tied tensor name(s) stored once (see metadata recoverkit.aliases)")
    return result


def _safetensors_header(
    stored: dict[str, tuple[str, TensorRecord]], aliases: dict[str, str], src: Source
) -> tuple[bytes, list[TensorRecord]]:
    """The JSON header (padded to 8 bytes) and the records in data order."""
    header: dict[str, Any] = {}
    order: list[TensorRecord] = []
    pos = 0
    for name, rec in stored.values():
        n = _numel(rec.shape) * dtype_from_name(rec.dtype).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[rec.dtype], "shape": list(rec.shape), "data_offsets": [pos, pos + n]}
        order.append(rec)
        pos += n
    header["__metadata__"] = {
        "format": "pt",
        "recoverkit.step": str(src.step),
        "recoverkit.run_id": src.manifest.run_id,
        "recoverkit.aliases": json.dumps(aliases, sort_keys=True),
    }
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8), order


# --------------------------------------------------------------------------- dcp
def export_dcp(
    src: Source,
    out: str,
    *,
    rank: int = 0,
    select: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """A ``torch.distributed.checkpoint`` directory of the consolidated state.

    Load it with ``dcp.load(state_dict, checkpoint_id=out)``: ``state_dict`` has the saved
    structure (``{"model": model.state_dict(), ...}``, or the entry's own state dict with
    ``select``); no process group is needed.
    """
    import torch.distributed.checkpoint as dcp

    tree, _ = consolidated_tree(src, rank=rank, select=select, allow_pickle=allow_pickle)
    if not isinstance(tree, dict):
        raise IncompatibleCheckpointError(
            f"--format dcp needs a mapping at the top; {select or 'the state'} is a {type(tree).__name__}"
        )
    records = _leaf_records(src, tree, rank)
    metas: dict[str, torch.Tensor] = {}
    sources: dict[int, TensorRecord] = {}
    for rec in records.values():
        if rec.key not in metas:
            metas[rec.key] = torch.empty(rec.shape, dtype=dtype_from_name(rec.dtype), device="meta")
            sources[id(metas[rec.key])] = rec
    state = _dcp_tree(tree, {k: metas[r.key] for k, r in records.items()})
    result = ExportResult(out, "dcp", src.step)
    planner = _streaming_planner(src, sources, result, progress)
    with _staged_dir(out, force) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: assuming a single process"
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False, thread_count=1, sync_files=True)
        dcp.save(state, storage_writer=writer, planner=planner)
    result.tensors = len(sources)
    return result


def _dcp_tree(node: Any, leaves: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, TensorLeaf):
        return leaves[node.key]
    if isinstance(node, dict):
        return {k: _dcp_tree(v, leaves) for k, v in node.items()}
    if isinstance(node, list):
        return [_dcp_tree(v, leaves) for v in node]
    if isinstance(node, tuple):
        return tuple(_dcp_tree(v, leaves) for v in node)
    return node


def _streaming_planner(src: Source, sources: dict[int, TensorRecord], result: ExportResult, progress: Progress | None) -> Any:
    """A DefaultSavePlanner whose ``resolve_data`` reads each tensor when it is written."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class StreamingSavePlanner(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            obj = self.lookup_object(write_item.index)
            if isinstance(obj, torch.Tensor) and id(obj) in sources:
                tensor = _read_full(src, sources[id(obj)])
                result.nbytes += tensor.numel() * tensor.element_size()
                if progress is not None:
                    progress(tensor.numel() * tensor.element_size())
                return tensor
            return self.transform_object(write_item, obj)

    return StreamingSavePlanner()


# --------------------------------------------------------------------------- recoverkit
@dataclass
class _Piece:
    """One region an output rank stores: which tensor, under which key, where."""

    key: str
    rec: TensorRecord
    box: Box


def export_recoverkit(
    src: Source, out_root: str, world_size: int, *, force: bool = False, progress: Progress | None = None
) -> ExportResult:
    """A recoverkit checkpoint of ``src`` resharded for ``world_size`` ranks under ``out_root``.

    Global tensors (sharded or replicated) are split along dim 0 into one contiguous block
    per rank; rank-local tensors and object state of rank ``r`` come from the source's rank
    ``r``, or rank 0's for ranks the source did not have (as a restore would do).
    """
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    tier = LocalTier(out_root)
    tier.fs.makedirs(tier.root)
    result = ExportResult(tier.step_path(src.step), "recoverkit", src.step)
    with RunLock(tier.root):
        if src.step in tier.steps() and not force:
            raise FileExistsError(f"{tier.step_path(src.step)} already exists (pass --force to replace it)")
        pieces, aliases = _reshard_plan(src.manifest, world_size, result)
        staging = tier.prepare(src.step)
        try:
            blobs: list[BlobRecord] = []
            files: dict[str, int] = {}
            tensors: dict[str, tuple[TensorRecord, list[ShardRecord]]] = {}
            for r in range(world_size):
                blob_rec, shard_recs, size = _write_rank_segment(src, staging, r, pieces[r], result, progress)
                blobs.append(blob_rec)
                files[segment_name(r)] = size
                for piece, rec in shard_recs:
                    tensors.setdefault(piece.key, (piece.rec, []))[1].append(rec)
            manifest = _resharded_manifest(src, world_size, tensors, aliases, blobs, files)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "replacing an existing committed step" (--force)
                tier.commit(src.step, staging, manifest)
        except BaseException:
            tier.abort(staging)
            raise
    result.tensors = len(tensors)
    return result


def _reshard_plan(
    manifest: Manifest, world_size: int, result: ExportResult
) -> tuple[list[list[_Piece]], dict[str, TensorRecord]]:
    """Per output rank, the pieces it stores (index 0 of each list is reserved for the blob)."""
    pieces: list[list[_Piece]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    aliases: dict[str, TensorRecord] = {}
    src_ranks = sorted({b.rank for b in manifest.blobs})
    multi = manifest.world_size > 1
    for key in sorted(manifest.tensors):
        rec = manifest.tensors[key]
        owner, rest = _split_local_key(key) if multi else (None, key)
        if rec.alias_of is not None:
            aliases[key] = rec
            continue
        if owner is not None:
            for r in range(world_size):
                if (r if r in src_ranks else 0) == owner:
                    new_key = rest if world_size == 1 else f"{local_prefix(r)}/{rest}"
                    pieces[r].append(_Piece(new_key, rec, ((0,) * len(rec.shape), rec.shape)))
            continue
        for r, box in _row_blocks(rec.shape, world_size, load):
            pieces[r].append(_Piece(key, rec, box))
            load[r] += _numel(box[1])
    dropped = [r for r in src_ranks if r >= world_size]
    if dropped:
        _note(result, f"rank-local state of source rank(s) {dropped} is not kept (the new world has {world_size})")
    grown = [r for r in range(world_size) if r not in src_ranks]
    if grown:
        _note(result, f"rank(s) {grown} get rank 0's rank-local state (random streams, data position)")
    return pieces, aliases


def _split_local_key(key: str) -> tuple[int | None, str]:
    """``rank-00003/x`` -> (3, "x"); a global key -> (None, key)."""
    head, sep, rest = key.partition("/")
    if sep and head.startswith("rank-") and head[5:].isdigit():
        return int(head[5:]), rest
    return None, key


def _row_blocks(shape: tuple[int, ...], world_size: int, load: list[int]) -> list[tuple[int, Box]]:
    """One contiguous block of dim-0 rows per rank; a scalar or empty tensor goes whole to
    the least-loaded rank."""
    if not shape or shape[0] == 0 or _numel(shape) == 0:
        owner = min(range(world_size), key=lambda r: load[r])
        return [(owner, ((0,) * len(shape), shape))]
    per = -(-shape[0] // world_size)
    out = []
    for r in range(world_size):
        lo, hi = min(shape[0], r * per), min(shape[0], (r + 1) * per)
        if hi > lo:
            out.append((r, ((lo,) + (0,) * (len(shape) - 1), (hi - lo,) + tuple(shape[1:]))))
    return out


def _write_rank_segment(
    src: Source, staging: str, rank: int, pieces: list[_Piece], result: ExportResult, progress: Progress | None
) -> tuple[BlobRecord, list[tuple[_Piece, ShardRecord]], int]:
    """Write one output rank's segment file region by region; fsync it; return its records."""
    blobs = {b.rank: b for b in src.manifest.blobs}
    blob_src = blobs[rank] if rank in blobs else blobs[0]
    blob = bytearray(blob_src.nbytes)
    src.tier.read(src.step, [(blob_src, _address(blob))])
    itemsize = {p.key: dtype_from_name(p.rec.dtype).itemsize for p in pieces}
    sizes = [len(blob)] + [_numel(p.box[1]) * itemsize[p.key] for p in pieces]
    offsets, end = plan_offsets(sizes)
    name = segment_name(rank)
    path = os.path.join(staging, name)
    records: list[tuple[_Piece, ShardRecord]] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, memoryview(blob), 0)
        for piece, offset, size in zip(pieces, offsets[1:], sizes[1:]):
            region = read_region(src.tier, src.step, piece.rec, piece.box)
            data = to_bytes_view(region).numpy()
            _pwrite_all(fd, memoryview(data), offset)
            records.append((piece, ShardRecord(rank, name, offset, size, crc32c(data), piece.box[0], piece.box[1])))
            result.nbytes += size
            if progress is not None:
                progress(size)
            del region, data
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)
    return BlobRecord(rank, name, 0, len(blob), crc32c(bytes(blob)), blob_src.encoding), records, end


def _resharded_manifest(
    src: Source,
    world_size: int,
    tensors: dict[str, tuple[TensorRecord, list[ShardRecord]]],
    aliases: dict[str, TensorRecord],
    blobs: list[BlobRecord],
    files: dict[str, int],
) -> Manifest:
    records: dict[str, TensorRecord] = {}
    for key, (rec, shards) in sorted(tensors.items()):
        records[key] = TensorRecord(key, rec.dtype, rec.shape, tuple(shards))
    records.update(aliases)
    meta = dict(src.manifest.user_meta)
    meta["recoverkit.resharded_from"] = {"world_size": src.manifest.world_size, "source": src.tier.describe(src.step)}
    return Manifest(
        step=src.step,
        run_id=src.manifest.run_id,
        world_size=world_size,
        tensors=records,
        blobs=tuple(blobs),
        files=files,
        pickled=src.manifest.pickled,
        user_meta=meta,
    )


# --------------------------------------------------------------------------- helpers
class _staged_file:
    """Write to ``<out>.tmp-<id>`` and rename onto ``out`` when the block succeeds."""

    def __init__(self, out: str, force: bool) -> None:
        self.out = os.path.abspath(out)
        if os.path.isdir(self.out):
            raise IsADirectoryError(f"{self.out} is a directory; --to needs a file path for this format")
        if os.path.exists(self.out) and not force:
            raise FileExistsError(f"{self.out} already exists (pass --force to replace it)")
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        self.tmp = f"{self.out}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.out)
            _fsync_dir(os.path.dirname(self.out))
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


class _staged_dir:
    """Write into ``<out>.tmp-<id>/`` and rename it to ``out`` when the block succeeds."""

    def __init__(self, out: str, force: bool) -> None:
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and not (os.path.isdir(self.out) and not os.listdir(self.out)) and not force:
            raise FileExistsError(f"{self.out} already exists (pass --force to replace it)")
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        self.tmp = f"{self.out}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> str:
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.lexists(self.out):
            old = f"{self.out}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            if os.path.isdir(old):
                shutil.rmtree(old)
            else:
                os.remove(old)
        else:
            os.rename(self.tmp, self.out)
        _fsync_dir(os.path.dirname(self.out))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _address(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if buf else 0
