"""``--format recoverkit``: a recoverkit checkpoint root resharded for another world size.

Each output rank's segment is written region by region with ``pwrite`` (regions read with
:func:`recoverkit.restore.reader.read_region`, every piece CRC-checked), then committed
with the node-local tier's protocol (manifest last, atomic rename).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from ...format.checksum import crc32c
from ...format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord
from ...format.segment import plan_offsets, segment_name
from ...state import dtype_from_name, to_bytes_view
from ...state.sharded import local_prefix
from ...storage.local import LocalTier
from ...storage.lock import RunLock
from ..reader import _numel, check_blob, read_region
from .common import ExportResult, Progress, Source, _note, _pwrite_all

Box = tuple[tuple[int, ...], tuple[int, ...]]


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
    src.tier.read(src.step, [(blob_src, blob)])
    check_blob(src.manifest, blob_src.rank, bytes(blob))  # never re-sign what does not decode
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
            _pwrite_all(fd, data.data, offset)  # the array's bytes (uint8), as a memoryview
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
