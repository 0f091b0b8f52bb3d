"""What every export format shares: the step being read and the result written, the
object tree and the records behind its tensors, and the staged-output helpers.

The format modules (``to_torch``, ``to_safetensors``, ``to_dcp``, ``resharded``) import
this one and never each other. It reads: :func:`select_tensors` is the one preamble of
the tensor formats (the tree of the entry asked for, the record behind each tensor, one
stored record per tied group, the format's dtype check, the result to fill);
:func:`read_blob` and :func:`consolidated_tree` give a rank's object tree, :func:`_read_full` one whole tensor (every piece CRC-checked
by :func:`recoverkit.restore.reader.read_region`). It writes: :class:`_staged_file` and
:class:`_staged_dir` put an output under a temporary name next to the target and rename
it into place when complete, so an interrupted export never leaves a half-written file
under its name; :func:`_pwrite_all` and :func:`_fsync_dir` are the write and durability
helpers around them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import IncompatibleCheckpointError
from ...format.manifest import Manifest, TensorRecord
from ...state.codec import decode
from ...storage.base import ReadableTier
from ..reader import read_region, resolve_record, tensor_leaves

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]


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


def _note(result: ExportResult, text: str) -> None:
    if text not in result.notes:
        result.notes.append(text)


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
    src.tier.read(src.step, [(rec, buf)])
    return bytes(buf)


@dataclass
class Selection:
    """What a tensor format exports: the tree (tensors as :class:`TensorLeaf`), the key
    prefix of the entry selected, each leaf's record, and the records to store (one per
    record key: a tied tensor is stored once), in tree order."""

    tree: Any
    prefix: str
    records: dict[str, TensorRecord]
    stored: dict[str, TensorRecord]
    result: ExportResult


def select_tensors(
    src: Source,
    out: str,
    fmt: str,
    *,
    rank: int = 0,
    select: str | None = None,
    allow_pickle: bool = False,
    holds: Callable[[str], bool] | None = None,
    cannot: str = "",
    mapping: bool = False,
) -> Selection:
    """The preamble every tensor format shares: read and decode rank ``rank``'s tree (only
    the entry ``select``), resolve every tensor to its verified manifest record, keep one
    record per stored tensor, and refuse a dtype the format cannot hold (``holds(dtype)``
    false: IncompatibleCheckpointError naming the tensor, ending with ``cannot``).
    ``mapping``: the format needs a mapping at the top of the tree.
    """
    tree, prefix = consolidated_tree(src, rank=rank, select=select, allow_pickle=allow_pickle)
    if mapping and not isinstance(tree, dict):
        raise IncompatibleCheckpointError(
            f"--format {fmt} needs a mapping at the top; {select or 'the state'} is a {type(tree).__name__}"
        )
    records = _leaf_records(src, tree, rank)
    stored: dict[str, TensorRecord] = {}
    for key, rec in records.items():
        if rec.key in stored:
            continue
        if holds is not None and not holds(rec.dtype):
            raise IncompatibleCheckpointError(
                f"step {src.step}: tensor {key!r} has dtype {rec.dtype}, which {cannot}"
            )
        stored[rec.key] = rec
    return Selection(tree, prefix, records, stored, ExportResult(out, fmt, src.step))


def _read_full(src: Source, rec: TensorRecord) -> torch.Tensor:
    """The whole tensor of ``rec``, every piece verified."""
    return read_region(src.tier, src.step, rec, ((0,) * len(rec.shape), rec.shape))


def _leaf_records(src: Source, tree: Any, rank: int) -> dict[str, TensorRecord]:
    """Leaf key -> the record holding its bytes, in tree order."""
    return {key: resolve_record(src.manifest, key, rank) for key in dict.fromkeys(tensor_leaves(tree))}


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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + (1 << 30)], offset + done)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

