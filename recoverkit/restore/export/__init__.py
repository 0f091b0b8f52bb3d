"""Export: read a committed step and write it in another format, one tensor in memory at a time.

Where it sits in the data flow: beside the restore path, not on it. ``recoverkit restore
--to`` (``cli/restore.py``) picks a committed step and verifies its manifest; this package
reads that step back through ``restore.reader`` and :func:`export` writes it as

* ``torch`` (``to_torch.py``): one ``torch.save`` file, loadable with
  ``torch.load(weights_only=True)``;
* ``safetensors`` (``to_safetensors.py``): one safetensors file with every tensor (tied
  tensors stored once);
* ``dcp`` (``to_dcp.py``): a ``torch.distributed.checkpoint`` directory (``dcp.load`` in
  one process);
* ``recoverkit`` (``resharded.py``): a recoverkit checkpoint root resharded for
  ``world_size`` ranks.

The consolidated formats hold one rank's view of the state (rank 0 by default): the object
tree that rank saved, with every tensor at its full global shape. Memory stays bounded by
the largest tensor, never the checkpoint: each tensor is assembled from its pieces with
:func:`recoverkit.restore.reader.read_region` (every piece CRC-checked), written out and
dropped before the next one is read. Every output is written under a temporary name next
to the target and renamed into place when complete (``common.py``), so an interrupted
export never leaves a half-written file under its name.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ...lazy import lazy_names

if TYPE_CHECKING:
    from ..reader import resolve_record
    from .common import ExportResult, Progress, Source, consolidated_tree, read_blob
    from .resharded import Box as Box
    from .resharded import export_recoverkit
    from .to_dcp import export_dcp
    from .to_safetensors import SAFETENSORS_DTYPES as SAFETENSORS_DTYPES
    from .to_safetensors import export_safetensors
    from .to_torch import export_torch

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

#: name -> the module that defines it; loaded on first use, so that naming the formats
#: (``FORMATS``, the CLI's ``--format`` choices) imports no format library, and an
#: export imports only its own format's writer.
_WHERE = {
    "Source": ".common",
    "ExportResult": ".common",
    "Progress": ".common",
    "consolidated_tree": ".common",
    "read_blob": ".common",
    "resolve_record": "..reader",
    "Box": ".resharded",
    "export_recoverkit": ".resharded",
    "export_dcp": ".to_dcp",
    "SAFETENSORS_DTYPES": ".to_safetensors",
    "export_safetensors": ".to_safetensors",
    "export_torch": ".to_torch",
}


__getattr__, __dir__ = lazy_names(globals(), _WHERE)


FORMATS = ("recoverkit", "torch", "safetensors", "dcp")


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
        from .resharded import export_recoverkit

        result = export_recoverkit(src, out, world_size or src.manifest.world_size, force=force, progress=progress)
    else:
        name = {"torch": "export_torch", "safetensors": "export_safetensors", "dcp": "export_dcp"}[fmt]
        writer = __getattr__(name)  # only this format's writer is imported
        result = writer(src, out, rank=rank, select=select, allow_pickle=allow_pickle, force=force, progress=progress)
    result.seconds = time.perf_counter() - t0
    return result
