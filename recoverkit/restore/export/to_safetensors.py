"""``--format safetensors``: one safetensors file with every tensor of the consolidated
state (tied tensors stored once).

The header (names, dtypes, shapes, offsets) is known from the manifest, so it is written
first and the tensors follow in order, one in memory at a time.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from ...format.dtypes import itemsize as dtype_itemsize
from ...format.manifest import TensorRecord
from ..reader import _numel, read_raw
from .common import ExportResult, Progress, Source, _note, _read_full, _staged_file, select_tensors

#: torch dtype name -> safetensors dtype name (the types safetensors can hold)
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}


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
    sel = select_tensors(
        src, out, "safetensors", rank=rank, select=select, allow_pickle=allow_pickle,
        holds=SAFETENSORS_DTYPES.__contains__,
        cannot="safetensors cannot hold; use --format torch or dcp, or --select an entry without it",
    )  # fmt: skip
    result, prefix = sel.result, sel.prefix
    stored: dict[str, tuple[str, TensorRecord]] = {}  # record key -> (name, record)
    aliases: dict[str, str] = {}
    for key, rec in sel.records.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if rec.key in stored:
            aliases[name] = stored[rec.key][0]
        else:
            stored[rec.key] = (name, rec)
    header, order = _safetensors_header(stored, aliases, src)
    with _staged_file(out, force) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for rec in order:
            data: Any = read_raw(src.tier, src.step, rec)  # slabs along dim 0: bytes, no torch
            if data is None:  # any other layout of pieces: assembled by the torch reader
                from ...format.dtypes import to_bytes_view

                data = to_bytes_view(_read_full(src, rec)).numpy()
            view = memoryview(data).cast("B")
            f.write(view)
            result.nbytes += view.nbytes
            if progress is not None:
                progress(view.nbytes)
            del data, view
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
        n = _numel(rec.shape) * dtype_itemsize(rec.dtype)
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
