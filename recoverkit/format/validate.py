"""Validation of a parsed manifest: the one gate every record passes before it is used.

A manifest's self-checksum proves only that it was not torn; anyone can re-sign an edited
one. So before any tier, reader, verifier or exporter allocates, reads or writes anything a
manifest describes, :func:`check_manifest` checks every record against its tensor and its
file, and raises :class:`~recoverkit.errors.IntegrityError` naming the first fault:

* the world: ``world_size`` is the number of ranks with an object blob, ranks ``0..W-1``,
  each once;
* names: every ``file`` is a safe relative name (no empty, ``.`` or ``..`` part, no NUL or
  backslash, not absolute); in segment layouts (node-local tiers) a plain name listed in
  ``files``; in the array layout (the zarr tier) a shard's ``file`` is its array's path
  (one of ``zarr_layout.array_path_candidates``: nested, nested and collision-renamed, or
  the previous flat layout's);
* regions: ``offset``/``nbytes`` are integers >= 0 and ``[offset, offset + nbytes)`` lies
  inside the file's recorded size (the tier then checks the real size against ``files``);
* checksums: an integer in ``[0, 2**32)``;
* tensors: a known dtype, a shape of at most :data:`MAX_NDIM` non-negative dimensions whose
  bytes fit in :data:`MAX_TENSOR_BYTES`; an alias names a stored tensor of the same dtype and
  shape, through no cycle;
* shards: owned by a rank of the world; ``offsets`` and ``shape`` have the tensor's rank,
  lie inside its global shape, record ``nbytes = numel x itemsize``, and together cover the
  tensor exactly (no overlap, no element left out);
* packs (version 2): a packed shard lies inside its pack, which has the shard's rank and
  file and lies inside that file (segment layouts only: the zarr tier never packs).

Everything here is arithmetic on the parsed records: it reads no file and allocates nothing
sized by the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import IntegrityError
from .dtypes import itemsize as dtype_itemsize
from .zarr_layout import array_path, array_path_candidates, legacy_array_path

if TYPE_CHECKING:
    from .manifest import Manifest, PackRecord, ShardRecord, TensorRecord

__all__ = ["MAX_NDIM", "MAX_TENSOR_BYTES", "check_manifest", "check_name", "numel"]

MAX_NDIM = 64
MAX_TENSOR_BYTES = 1 << 56  # 64 PiB: more than any real tensor, small enough to never overflow
#: pairs of shards compared when checking that none overlap; beyond it a tensor is refused
#: as too fragmented (writers produce grids whose sweep compares a handful per shard)
OVERLAP_BUDGET = 4_000_000
_U32 = 1 << 32


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_name(name: object, *, where: str, nested: bool = False) -> str:
    """``name`` if it is a safe file name inside a step (``nested``: a relative path)."""
    if not isinstance(name, str) or not name:
        raise IntegrityError(f"{where}: file name {name!r} is not a non-empty string", path=where)
    parts = name.split("/")
    if (
        "\x00" in name
        or "\\" in name
        or (not nested and len(parts) > 1)
        or any(p in ("", ".", "..") for p in parts)
    ):
        kind = "a relative path" if nested else "a plain file name"
        raise IntegrityError(f"{where}: file name {name!r} is not {kind} inside the step", path=where)
    return name


def check_manifest(manifest: Manifest, *, where: str, arrays: bool = False) -> None:
    """Raise IntegrityError unless every record of ``manifest`` is consistent (see module doc).

    Args:
        manifest: a parsed manifest (its fields already have the right Python types).
        where: the manifest's path or URL, for messages.
        arrays: the zarr tier's layout (shards live in arrays, blobs in files); otherwise the
            segment layout (every shard and blob lives in a file listed in ``files``).
    """
    m = manifest
    if not 0 <= m.step < 1 << 63:
        raise IntegrityError(f"{where}: step {m.step if m.step < 1 << 64 else 'of many digits'} is out of range", path=where)
    ranks = sorted(b.rank for b in m.blobs)
    if m.world_size != len(ranks) or ranks != list(range(len(ranks))) or not ranks:
        raise IntegrityError(
            f"{where}: world_size {m.world_size} but object blobs for ranks {ranks[:8]}"
            f"{'...' if len(ranks) > 8 else ''} (every rank 0..world_size-1 exactly once)",
            path=where,
        )
    for name, size in m.files.items():
        check_name(name, where=where, nested=arrays)
        _check_int(size, f"{where}: size of file {name!r}")
    if m.held is not None:
        for name in m.held:
            if name not in m.files:
                raise IntegrityError(f"{where}: held file {name!r} is not listed in files", path=where)
    for b in m.blobs:
        _check_region(m.files, b.file, b.offset, b.nbytes, b.crc32c, f"{where}: blob of rank {b.rank}", nested=arrays)
    itemsizes: dict[str, int] = {}
    packs: dict[int, PackRecord] = {}
    for key, rec in m.tensors.items():
        if not key or "\x00" in key:
            raise IntegrityError(f"{where}: tensor key {key!r} is not a non-empty string", path=where)
        itemsize = itemsizes.get(rec.dtype)
        if itemsize is None:  # IncompatibleCheckpointError for an unknown or quantized dtype
            itemsize = itemsizes[rec.dtype] = dtype_itemsize(rec.dtype)
        shape = rec.shape
        if len(shape) > MAX_NDIM or (shape and min(shape) < 0):
            raise IntegrityError(f"{where}: tensor {key!r}: shape {list(shape)[:MAX_NDIM + 1]} is not a tensor shape", path=where)
        total = math.prod(shape)
        if total * itemsize > MAX_TENSOR_BYTES:
            raise IntegrityError(f"{where}: tensor {key!r}: shape {list(shape)} is {total * itemsize} bytes", path=where)
        if rec.alias_of is None:
            _check_shards(m, key, rec, itemsize, total, where, arrays=arrays)
            for sh in rec.shards:
                if sh.pack is not None and id(sh.pack) not in packs:
                    packs[id(sh.pack)] = sh.pack
        elif rec.shards:
            raise IntegrityError(f"{where}: tensor {key!r}: an alias holds no shards of its own", path=where)
    for p in packs.values():
        _check_region(m.files, p.file, p.offset, p.nbytes, p.crc32c, f"{where}: pack of rank {p.rank} at {p.offset}")
    for key, rec in m.tensors.items():  # aliases once every stored tensor is known good
        if rec.alias_of is not None:
            _check_alias(m.tensors, rec, f"{where}: tensor {key!r}")


def _check_int(value: int, what: str, *, bound: int = MAX_TENSOR_BYTES) -> None:
    if value < 0 or value > bound:
        raise IntegrityError(f"{what}: {value} is out of range [0, {bound}]")


def _check_region(
    files: Mapping[str, int], name: str, offset: int, nbytes: int, crc: int, what: str, *, nested: bool = False
) -> None:
    check_name(name, where=what, nested=nested)
    if not 0 <= crc < 1 << 32:
        raise IntegrityError(f"{what}: crc32c {crc} is not a 32-bit checksum", path=name)
    size = files.get(name)
    if size is None:
        raise IntegrityError(f"{what}: file {name!r} is not listed in the manifest's files", path=name)
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise IntegrityError(
            f"{what}: bytes [{offset}, {offset + nbytes}) of {name!r} lie outside its {size} recorded bytes", path=name
        )


def _check_alias(tensors: Mapping[str, TensorRecord], rec: TensorRecord, what: str) -> None:
    seen = {rec.key}
    target = rec
    while target.alias_of is not None:
        nxt = tensors.get(target.alias_of)
        if nxt is None or nxt.key in seen:
            why = "is not in the manifest" if nxt is None else "forms a cycle"
            raise IntegrityError(f"{what}: alias of {target.alias_of!r}, which {why}")
        seen.add(nxt.key)
        target = nxt
    if target.dtype != rec.dtype or target.shape != rec.shape:
        raise IntegrityError(
            f"{what}: alias ({rec.dtype} {list(rec.shape)}) of {target.key!r} ({target.dtype} {list(target.shape)})"
        )


def _check_shards(
    m: Manifest, key: str, rec: TensorRecord, itemsize: int, total: int, where: str, *, arrays: bool
) -> None:
    """Each shard in the world, inside the tensor and its file, sized by its elements; then
    together an exact cover. A fast test per shard; the slow one names what is wrong."""
    ndim, gshape, world, files = len(rec.shape), rec.shape, m.world_size, m.files
    if len(rec.shards) == 1 and not arrays:  # the common case: one shard, the whole tensor
        s = rec.shards[0]
        p, end = s.pack, s.offset + s.nbytes
        if (
            s.shape == gshape and len(s.offsets) == ndim and not any(s.offsets) and 0 <= s.rank < world
            and s.nbytes == total * itemsize and 0 <= s.crc32c < _U32 and s.offset >= 0
            and end <= files.get(s.file, -1)
            and (p is None or (
                p.file == s.file and p.rank == s.rank and p.crc32c == s.crc32c
                and p.offset <= s.offset and end <= p.offset + p.nbytes
            ))
        ):  # fmt: skip
            return
    natural = array_path(key) if arrays else ""
    covered = 0
    for s in rec.shards:
        offsets, shape = s.offsets, s.shape
        count = math.prod(shape)
        end = s.offset + s.nbytes
        ok = (
            0 <= s.rank < world and len(offsets) == ndim and len(shape) == ndim
            and s.nbytes == count * itemsize and 0 <= s.crc32c < _U32 and s.offset >= 0
            and all(0 <= o and 0 <= n and o + n <= g for o, n, g in zip(offsets, shape, gshape))
            and (
                s.offset == 0 and (s.file == natural or s.file == natural + "~" or s.file == legacy_array_path(key))
                and s.pack is None
                if arrays else end <= files.get(s.file, -1)
            )
            and (
                s.pack is None or (
                    s.pack.file == s.file and s.pack.rank == s.rank and s.pack.crc32c == s.crc32c
                    and s.pack.offset <= s.offset and end <= s.pack.offset + s.pack.nbytes
                )
            )
        )  # fmt: skip
        if not ok:
            _shard_fault(m, key, rec, s, itemsize, where, arrays=arrays)
        covered += count
    if covered != total:
        raise IntegrityError(f"{where}: tensor {key!r}: its shards hold {covered} element(s), the tensor has {total}")
    _check_disjoint(rec.shards, ndim, f"{where}: tensor {key!r}")


def _shard_fault(
    m: Manifest, key: str, rec: TensorRecord, s: ShardRecord, itemsize: int, where: str, *, arrays: bool
) -> None:
    """Raise the IntegrityError that says what is wrong with shard ``s`` (it failed a check)."""
    ndim = len(rec.shape)
    at = f"{where}: tensor {key!r} shard offsets={list(s.offsets)[:ndim + 1]} shape={list(s.shape)[:ndim + 1]}"
    if not 0 <= s.rank < m.world_size:
        raise IntegrityError(f"{at}: rank {s.rank} is not in the world of {m.world_size}")
    if len(s.offsets) != ndim or len(s.shape) != ndim:
        raise IntegrityError(f"{at}: the tensor has {ndim} dimension(s)")
    for o, n, g in zip(s.offsets, s.shape, rec.shape):
        if o < 0 or n < 0 or o + n > g:
            raise IntegrityError(f"{at}: lies outside the global shape {list(rec.shape)}")
    count = math.prod(s.shape)
    if s.nbytes != count * itemsize:
        raise IntegrityError(f"{at}: records {s.nbytes} bytes, its {count} element(s) of {rec.dtype} take {count * itemsize}")
    if s.pack is not None:
        p = s.pack
        if arrays:
            raise IntegrityError(f"{at}: a packed shard in the array layout (the zarr tier never packs)")
        if p.file != s.file or p.rank != s.rank or p.crc32c != s.crc32c:
            raise IntegrityError(f"{at}: its pack is in rank {p.rank}'s {p.file!r}, the shard in rank {s.rank}'s {s.file!r}")
        if not p.offset <= s.offset <= s.offset + s.nbytes <= p.offset + p.nbytes:
            raise IntegrityError(
                f"{at}: bytes [{s.offset}, {s.offset + s.nbytes}) lie outside its pack [{p.offset}, {p.offset + p.nbytes})"
            )
    if arrays:
        if not 0 <= s.crc32c < _U32:
            raise IntegrityError(f"{at}: crc32c {s.crc32c} is not a 32-bit checksum")
        natural, renamed, legacy = array_path_candidates(key)
        raise IntegrityError(
            f"{at}: stored in {s.file!r} at {s.offset}, its array is {natural!r} "
            f"(or {renamed!r} beside a group of that name, or {legacy!r} in the previous layout) at 0"
        )
    _check_region(m.files, s.file, s.offset, s.nbytes, s.crc32c, at)
    raise IntegrityError(f"{at}: inconsistent record")  # pragma: no cover - one check above fails


def _check_disjoint(shards: Sequence[ShardRecord], ndim: int, what: str) -> None:
    """No two non-empty shards overlap (with the element count, this means exact coverage).

    A sweep along the dimension with the most distinct shard offsets: shards are taken in
    order of their start there and compared only with those still open at that start.
    """
    boxes = [(s.offsets, s.shape) for s in shards if numel(s.shape)]
    if len(boxes) < 2:
        return
    if ndim == 0:
        raise IntegrityError(f"{what}: a 0-d tensor has {len(boxes)} shards")
    dim = max(range(ndim), key=lambda d: len({o[d] for o, _ in boxes}))
    boxes.sort(key=lambda b: b[0][dim])
    budget = OVERLAP_BUDGET
    open_: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offs, shape in boxes:
        start = offs[dim]
        open_ = [b for b in open_ if b[0][dim] + b[1][dim] > start]
        budget -= len(open_) + 1
        if budget < 0:
            raise IntegrityError(f"{what}: {len(boxes)} shards are too fragmented to check for overlaps")
        for o2, s2 in open_:
            if all(max(a, b) < min(a + n, b + k) for a, n, b, k in zip(offs, shape, o2, s2)):
                raise IntegrityError(
                    f"{what}: shards offsets={list(o2)} shape={list(s2)} and offsets={list(offs)} "
                    f"shape={list(shape)} overlap"
                )
        open_.append((offs, shape))
