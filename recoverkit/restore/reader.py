"""Read a committed step back into a state tree (tensors on CPU), verifying every byte.

manifest -> this rank's object blob -> for each tensor the tree refers to, the region this
rank needs -> ``unflatten``. A region is assembled from the saved pieces that overlap it:
a piece that lands contiguously in the destination is read straight into it; any other is
read into a bounded temporary and its overlap copied. The engine checks every piece's
CRC-32C as it reads. Nothing is applied to live objects here, so a fault found while
reading leaves the training state untouched.

Rank-local tensors of a multi-rank step live under ``rank-RRRRR/``; a rank that did not
exist when the step was saved (the world grew) reads rank 0's local state.

Read *in place* (``in_place=True``, or inside :func:`in_place_reads`: restore only), a
whole tensor whose pieces a tier holds in memory is not copied here at all: it comes back as
a verified :class:`~recoverkit.restore.in_place.PendingTensor` that ``restore.apply`` copies
straight into its live target (see :mod:`recoverkit.restore.in_place`).

Torch is imported only where a tensor is made: checking a blob (``check_blob``), resolving
records and reading raw bytes (:func:`read_raw`) need none of it, so the CLI's read-only
commands and ``--format torch`` run without importing torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleCheckpointError, IntegrityError, PickleNotAllowedError
from ..format.dtypes import dtype_from_name, from_bytes, to_bytes_view
from ..format.dtypes import itemsize as dtype_itemsize
from ..format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord, local_prefix
from ..state.codec import decode
from ..state.leaf import TensorLeaf
from ..storage.base import ReadableTier

if TYPE_CHECKING:
    import torch

    from ..state.sharded import ShardedTensor

__all__ = [
    "NOT_READ", "read_state", "read_region", "read_raw", "tensor_leaves", "blob_rank", "resolve_record", "check_blob",
    "in_place_reads", "slab_layout",
]  # fmt: skip

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape)


class _NotRead:
    def __repr__(self) -> str:
        return "<not read>"


#: the value of an entry ``read_state`` was asked not to read
NOT_READ: Any = _NotRead()

_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("recoverkit_in_place_reads", default=False)


@contextlib.contextmanager
def in_place_reads(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`read_state` reads in place unless told otherwise: what a
    restore wraps around its recovery chain, so that every strategy's reads (whatever tier
    they come from) hand ``restore.apply`` tensors it can copy straight into the live ones.
    Only for trees that go to ``apply_restored``.

    Example:
        >>> with in_place_reads():
        ...     _IN_PLACE.get()
        True
        >>> _IN_PLACE.get()
        False
    """
    token = _IN_PLACE.set(enabled)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def blob_rank(manifest: Manifest, rank: int) -> int:
    """Whose object state ``rank`` restores: its own, or rank 0's if it did not exist."""
    if any(b.rank == rank for b in manifest.blobs):
        return rank
    warnings.warn(
        f"step {manifest.step} was saved by {manifest.world_size} rank(s); rank {rank} restores "
        "rank 0's local state (random streams, data position)",
        stacklevel=3,
    )
    return 0


def read_state(
    tier: ReadableTier,
    step: int,
    manifest: Manifest,
    *,
    rank: int = 0,
    allow_pickle: bool = False,
    sharded: Mapping[str, ShardedTensor] | None = None,
    entries: Collection[str] | None = None,
    in_place: bool | None = None,
) -> Any:
    """Read rank ``rank``'s state tree of ``step``.

    ``sharded`` maps tensor keys to the ShardedTensors the restoring rank holds; for those
    only the rank's region is read, and the tree gets a new ShardedTensor in their place.
    ``entries`` names the top-level entries to read; the others keep their name with the
    value :data:`NOT_READ` and none of their tensors is read. ``in_place`` (default: as
    :func:`in_place_reads` says, else False): a whole tensor the tier holds in memory comes
    back as a verified PendingTensor for ``restore.apply`` (see the module docstring); every
    CRC of those is checked before this returns.
    """
    from ..state.flatten import unflatten
    from ..state.sharded import ShardedTensor
    from .in_place import PendingTensor, Unit, collect, tier_engine, verify

    if in_place is None:
        in_place = _IN_PLACE.get()

    src = blob_rank(manifest, rank)
    blob_rec = manifest.blob_for(src)
    blob = bytearray(blob_rec.nbytes)  # validated against the file's real size by the tier
    tier.read(step, [(blob_rec, blob)])
    skeleton = decode(bytes(blob), allow_pickle=allow_pickle)
    if entries is not None and isinstance(skeleton, dict):
        skeleton = {k: v if k in entries else NOT_READ for k, v in skeleton.items()}
    sharded = sharded or {}
    values: dict[str, Any] = {}
    regions: list[_Region] = []
    units: dict[tuple[str, int, int], Unit] = {}  # regions in memory, verified below
    for key in sorted(set(tensor_leaves(skeleton))):
        rec = resolve_record(manifest, key, src)
        if rec.key in values:
            values[key] = values[rec.key]
            continue
        pending = collect(tier, step, rec, units) if in_place and key not in sharded else None
        if pending is not None:
            values[key] = values[rec.key] = pending
            continue
        if key in sharded:
            target = sharded[key]
            if tuple(target.global_shape) != rec.shape:
                raise IncompatibleCheckpointError(
                    f"step {step}: {key!r} has global shape {list(rec.shape)}, the target expects "
                    f"{list(target.global_shape)}"
                )
            region = _Region(step, rec, (tuple(target.offsets), tuple(target.local.shape)))
            values[key] = ShardedTensor(region.out, rec.shape, region.box[0])
        else:
            region = _Region(step, rec, ((0,) * len(rec.shape), rec.shape))
            values[key] = region.out
        regions.append(region)
        values[rec.key] = values[key]
    if units:  # every region in memory, before anything is read or applied
        verify(list(units.values()), engine=tier_engine(tier))
        for leaf in _leaves(skeleton):  # a new tensor made of one is a Parameter again
            value = values.get(leaf.key)
            if leaf.parameter and isinstance(value, PendingTensor):
                value.parameter = leaf.requires_grad
    # every piece that lands in place, of every tensor, in one request (one pass per file)
    tier.read(step, [req for r in regions for req in r.direct])
    for region in regions:
        region.fill(tier)
    return unflatten(skeleton, values)


def read_region(tier: ReadableTier, step: int, rec: TensorRecord, box: Box) -> torch.Tensor:
    """The region ``box`` of tensor ``rec``, from the pieces that overlap it."""
    region = _Region(step, rec, box)
    tier.read(step, region.direct)
    region.fill(tier)
    return region.out


class _Region:
    """The plan for one region: its output tensor, the pieces that land in it in place
    (``direct``), and the others (``staged``: read one at a time into a temporary, then
    their overlap copied by :meth:`fill`)."""

    def __init__(self, step: int, rec: TensorRecord, box: Box) -> None:
        self.step, self.box = step, box
        dtype = dtype_from_name(rec.dtype)
        self.out = out = _empty(box[1], dtype)
        self.direct: list[tuple[ShardRecord | BlobRecord, torch.Tensor]] = []
        self.staged: list[ShardRecord] = []
        if out.numel() == 0:
            return
        row_bytes = (out[0].numel() if out.dim() else 1) * out.element_size()
        out_bytes = to_bytes_view(out)
        covered = 0
        for shard in rec.shards:
            inter = _intersect((shard.offsets, shard.shape), box)
            if inter is None:
                continue
            covered += _numel(inter[1])
            if out.dim() == 0:
                self.direct.append((shard, out_bytes))
            elif shard.shape[1:] == box[1][1:] and shard.offsets[1:] == box[0][1:] and inter[1] == shard.shape:
                start = (shard.offsets[0] - box[0][0]) * row_bytes
                self.direct.append((shard, out_bytes[start : start + shard.nbytes]))
            else:
                self.staged.append(shard)
        if covered != out.numel():
            raise IntegrityError(
                f"step {step}: the saved shards of {rec.key!r} cover {covered} of the {out.numel()} elements "
                f"of region offsets={list(box[0])} shape={list(box[1])}"
            )

    def fill(self, tier: ReadableTier) -> None:
        """Read the staged pieces (bounded: one at a time) and copy their overlap in."""
        for shard in self.staged:
            part = _empty(shard.shape, self.out.dtype)
            tier.read(self.step, [(shard, to_bytes_view(part))])
            inter = _intersect((shard.offsets, shard.shape), self.box)
            assert inter is not None
            _narrow(self.out, inter, self.box[0]).copy_(_narrow(part, inter, shard.offsets))


def read_raw(tier: ReadableTier, step: int, rec: TensorRecord) -> bytearray | mmap.mmap | None:
    """The whole tensor of ``rec`` as bytes (C order) when its pieces are slabs along dim 0
    that tile it: every piece is read in place and CRC-checked by the tier, and no torch is
    needed. None for any other layout of pieces (:func:`read_region` assembles those)."""
    if _numel(rec.shape) == 0:
        return bytearray()
    layout = slab_layout(step, rec)
    if layout is None:
        return None
    row_bytes, slabs = layout
    out = _buffer(rec.nbytes)
    view = memoryview(out)
    tier.read(step, [(s, view[start * row_bytes : (start + n) * row_bytes]) for start, n, s in slabs])
    return out


def slab_layout(step: int, rec: TensorRecord) -> tuple[int, list[tuple[int, int, ShardRecord]]] | None:
    """``(row_bytes, [(first row, rows, shard)])`` when the pieces of ``rec`` are whole rows
    (slabs along dim 0) that tile it in order, each row exactly once (a 0-d tensor: its one
    piece, as one row); None for any other layout. IntegrityError when such slabs leave
    rows uncovered.

    Example:
        >>> piece = ShardRecord(0, "f", 0, 16, 0, (0, 0), (2, 2))
        >>> slab_layout(1, TensorRecord("w", "float32", (2, 2), (piece,)))[0]
        8
    """
    numel = _numel(rec.shape)
    if not rec.shape:  # 0-d: one piece holds it
        if len(rec.shards) != 1:
            return None
        return rec.shards[0].nbytes, [(0, 1, rec.shards[0])]
    rows = rec.shape[0]
    if numel == 0:
        return None
    row_bytes = numel // rows * dtype_itemsize(rec.dtype)
    pieces = []
    for s in rec.shards:
        if tuple(s.shape[1:]) != tuple(rec.shape[1:]) or any(s.offsets[1:]) or s.shape[0] == 0:
            return None
        pieces.append((s.offsets[0], s.shape[0], s))
    pieces.sort(key=lambda p: p[0])
    at = 0
    for start, n, s in pieces:  # exactly once each row, in order
        if start != at or s.nbytes != n * row_bytes:
            return None
        at += n
    if at != rows:
        raise IntegrityError(f"step {step}: the saved pieces of {rec.key!r} cover {at} of its {rows} rows")
    return row_bytes, pieces


def _buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A writable buffer the reads land in: large ones are anonymous maps, whose pages are
    zero-filled only as the read touches them (a bytearray clears every byte first)."""
    return mmap.mmap(-1, nbytes) if nbytes >= 1 << 20 else bytearray(nbytes)


def tensor_leaves(tree: Any) -> Iterator[str]:
    """Keys of every tensor placeholder in a decoded object tree."""
    return (leaf.key for leaf in _leaves(tree))


def _leaves(tree: Any) -> Iterator[TensorLeaf]:
    if isinstance(tree, TensorLeaf):
        yield tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(k)
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple, set, frozenset)):
        for v in tree:
            yield from _leaves(v)


def resolve_record(manifest: Manifest, key: str, rank: int = 0) -> TensorRecord:
    """The record holding the bytes of tensor ``key`` as ``rank`` sees it (aliases followed)."""
    rec = manifest.tensors.get(f"{local_prefix(rank)}/{key}") or manifest.tensors.get(key)
    seen: set[str] = set()
    while rec is not None and rec.alias_of is not None and rec.key not in seen:
        seen.add(rec.key)
        rec = manifest.tensors.get(rec.alias_of)
    if rec is None or rec.alias_of is not None:
        raise IntegrityError(
            f"step {manifest.step}: the object state refers to tensor {key!r}, which is not in the manifest"
        )
    return rec


def check_blob(manifest: Manifest, rank: int, data: bytes) -> None:
    """Raise IntegrityError unless ``data``, rank ``rank``'s verified blob, decodes and every
    tensor it refers to is in the manifest. Nothing is unpickled: a ``$pickle`` node is
    accepted (unchecked) only in a step that records ``pickled``."""
    try:
        tree = decode(data, allow_pickle=False)
    except PickleNotAllowedError:
        if not manifest.pickled:
            raise IntegrityError(
                f"step {manifest.step}: the object state of rank {rank} holds a pickled value, "
                "but the manifest says it holds none"
            ) from None
        return
    for key in set(tensor_leaves(tree)):
        resolve_record(manifest, key, rank)


def _intersect(a: Box, b: Box) -> Box | None:
    offs, shape = [], []
    for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if hi <= lo:
            return None
        offs.append(lo)
        shape.append(hi - lo)
    return tuple(offs), tuple(shape)


def _narrow(t: torch.Tensor, box: Box, origin: tuple[int, ...]) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(box[0], box[1])):
        t = t.narrow(dim, o - origin[dim], n)
    return t


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialized memory for any storable dtype (bit-packed and float4 kinds included)."""
    import torch

    return from_bytes(torch.empty(_numel(shape) * dtype.itemsize, dtype=torch.uint8), dtype, shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
