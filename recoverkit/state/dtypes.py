"""Dtype names and raw byte views, as the state layer uses them.

Sits between capture and staging in the save data flow (``flatten`` -> **bytes view** ->
staging pool / segment file) and between the reader and ``unflatten`` on restore (segment
bytes -> **typed view** -> live tensor). The table of names and item sizes and the view
functions live in :mod:`recoverkit.format.dtypes` (torch-free to import, so the format checks
and the CLI's read-only commands need no torch); this module adds the torch dtype objects of
this build.
"""

from __future__ import annotations

import torch

from ..format.dtypes import (  # noqa: F401 - _storage_bytes is re-exported for tests
    _storage_bytes,
    dtype_from_name,
    dtype_name,
    from_bytes,
    nbytes,
    quantized_by_name,
    storable_by_name,
    to_bytes_view,
)

__all__ = [
    "dtype_name",
    "dtype_from_name",
    "to_bytes_view",
    "from_bytes",
    "nbytes",
    "STORABLE_DTYPES",
]

_BY_NAME: dict[str, torch.dtype] = storable_by_name()
_QUANTIZED: dict[str, torch.dtype] = quantized_by_name()

#: Every dtype this torch build can store, by canonical name.
STORABLE_DTYPES: tuple[torch.dtype, ...] = tuple(_BY_NAME.values())
