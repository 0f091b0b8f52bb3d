"""``--format torch``: one ``torch.save`` file of the consolidated state, loadable with
``torch.load(weights_only=True)``, written one tensor at a time.

The file is written by :mod:`.torch_zip` with the standard library (torch is not imported
for it): the object tree is pickled with a stub per stored tensor (aliases share one, so a
tied weight comes back as one tensor), then each storage's bytes are read from the
checkpoint, every piece CRC-checked, and streamed into its zip record. A tensor stored in
pieces along its first dimension (how a rank splits a large tensor, and how ranks shard
along dim 0) is assembled as raw bytes; any other layout of pieces is assembled by
:func:`recoverkit.restore.reader.read_region` (which uses torch).

Values ``torch.load(weights_only=True)`` refuses become the nearest type it accepts, with
a note: numpy arrays become tensors, numpy scalars Python scalars, frozensets sets, ranges
and slices ``(start, stop, step)`` tuples.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ...errors import IncompatibleCheckpointError
from ...state.leaf import TensorLeaf
from ..reader import read_raw
from .common import ExportResult, Progress, Source, _note, _read_full, _staged_file, select_tensors
from .torch_zip import TorchFile, torch_savable

__all__ = ["export_torch"]

#: numpy dtype (``dtype.name``) -> the torch dtype a numpy array is exported as
_NUMPY_DTYPES = {
    "bool": "bool", "uint8": "uint8", "int8": "int8", "int16": "int16", "int32": "int32",
    "int64": "int64", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "float16": "float16", "float32": "float32", "float64": "float64",
    "complex64": "complex64", "complex128": "complex128",
}  # fmt: skip


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
    sel = select_tensors(
        src, out, "torch", rank=rank, select=select, allow_pickle=allow_pickle,
        holds=torch_savable, cannot="a torch file cannot hold (torch.save refuses it)",
    )  # fmt: skip
    result = sel.result
    plan = TorchFile()
    stubs = {k: plan.tensor(rec.dtype, rec.shape, source=rec) for k, rec in sel.stored.items()}  # aliases share one
    saved = _torch_tree(sel.tree, {k: stubs[r.key] for k, r in sel.records.items()}, plan, result)
    archive = _archive_name(out)
    with _staged_file(out, force) as tmp:
        with open(tmp, "wb") as f:
            result.nbytes = plan.write(
                f, saved, read=lambda s: _storage_bytes(src, s), archive=archive, progress=progress
            )
            f.flush()
            os.fsync(f.fileno())
    result.tensors = len(stubs)
    return result


def _archive_name(out: str) -> str:
    """The folder inside the archive: the file's name without extension, as torch.save names it."""
    stem = os.path.splitext(os.path.basename(out))[0]
    return stem if stem and stem.isascii() and "/" not in stem else "archive"


def _storage_bytes(src: Source, source: Any) -> Any:
    """The bytes of one storage: a tensor record's (read and verified) or an array's."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source
    raw = read_raw(src.tier, src.step, source)
    if raw is not None:
        return raw
    from ...format.dtypes import to_bytes_view  # torch: pieces in any other layout

    return to_bytes_view(_read_full(src, source).contiguous()).numpy()


def _torch_tree(node: Any, stubs: dict[str, Any], plan: TorchFile, result: ExportResult) -> Any:
    """The tree to pickle: stored tensors become stubs, and the few values
    ``torch.load(weights_only=True)`` refuses become the nearest type it accepts."""
    if isinstance(node, TensorLeaf):
        return stubs[node.key]
    if isinstance(node, dict):
        items = [(k, _torch_tree(v, stubs, plan, result)) for k, v in node.items()]
        out = type(node)(items) if type(node) is not dict and _rebuildable(node) else dict(items)
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(node, list):
        return [_torch_tree(v, stubs, plan, result) for v in node]
    if isinstance(node, tuple) and type(node).__module__ != "torch":  # torch.Size pickles itself
        return tuple(_torch_tree(v, stubs, plan, result) for v in node)
    np = sys.modules.get("numpy")  # numpy values exist only if the decoder imported numpy
    if np is not None and isinstance(node, np.ndarray):
        return _array(node, plan, result)
    if np is not None and isinstance(node, np.generic):
        _note(result, "numpy scalars were stored as Python scalars")
        return node.item()
    if isinstance(node, frozenset):
        _note(result, "frozensets were stored as sets")
        return set(node)
    if isinstance(node, (range, slice)):
        _note(result, "ranges and slices were stored as (start, stop, step) tuples")
        return (node.start, node.stop, node.step)
    return node


def _array(a: Any, plan: TorchFile, result: ExportResult) -> Any:
    """A numpy array as a tensor stub holding a copy of its bytes (C order)."""
    dtype = _NUMPY_DTYPES.get(a.dtype.name) if a.dtype.isnative or a.dtype.itemsize == 1 else None
    if dtype is None:
        raise IncompatibleCheckpointError(
            f"a numpy array of dtype {a.dtype} cannot be stored as a torch tensor"
        )
    _note(result, "numpy arrays were stored as tensors")
    return plan.tensor(dtype, a.shape, source=a.tobytes(order="C"))


def _rebuildable(node: dict) -> bool:  # type: ignore[type-arg]
    try:
        type(node)()
        return True
    except TypeError:
        return False
