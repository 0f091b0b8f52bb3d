"""The one dtype table (``recoverkit.format.dtypes``) agrees with torch, and needs no torch.

The format checks and the CLI's read-only commands size every region from this table without
importing torch, so a wrong entry would let a manifest pass validation with the wrong byte
counts: every entry is compared with torch's own ``dtype.itemsize``, and every storable dtype
of this torch build must be in the table.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from recoverkit.errors import IncompatibleCheckpointError
from recoverkit.format import dtypes
from recoverkit.state.dtypes import STORABLE_DTYPES, dtype_from_name, dtype_name


def test_item_sizes_match_torch():
    for name, size in dtypes.ITEMSIZE.items():
        dt = getattr(torch, name, None)
        if dt is None:  # a name newer than this torch: nothing to compare with
            continue
        assert isinstance(dt, torch.dtype) and dt.itemsize == size, name
        assert str(dt) == f"torch.{name}", f"{name} is not canonical ({dt})"


def test_every_dtype_torch_can_store_is_in_the_table():
    """Every dense dtype torch has (bar the quantized ones) is named in the table."""
    every = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    quantized = {getattr(torch, n) for n in dtypes.QUANTIZED_NAMES if hasattr(torch, n)}
    missing = sorted(
        str(d) for d in every - quantized if str(d).removeprefix("torch.") not in dtypes.ITEMSIZE
    )
    assert not missing, f"dtypes of this torch missing from the table: {missing}"
    assert set(STORABLE_DTYPES) == every - quantized


def test_aliases_resolve_to_the_same_dtype():
    for alias, name in dtypes.ALIASES.items():
        assert getattr(torch, alias) is getattr(torch, name), alias
        assert dtypes.canonical_name(alias) == name
        assert dtypes.itemsize(alias) == getattr(torch, name).itemsize
        assert dtype_from_name(alias) is getattr(torch, name)
    for dt in STORABLE_DTYPES:
        assert dtype_from_name(dtype_name(dt)) is dt


@pytest.mark.parametrize("bad", ["qint8", "float128", "", "torch.float32", 3, None])
def test_unknown_and_quantized_names_are_refused(bad):
    with pytest.raises(IncompatibleCheckpointError):
        dtypes.itemsize(bad)
    with pytest.raises(IncompatibleCheckpointError):
        dtype_from_name(bad)  # type: ignore[arg-type]


def test_the_table_and_the_format_checks_import_no_torch():
    code = (
        "import sys; from recoverkit.format import dtypes, validate, zarr_layout; "
        "assert dtypes.itemsize('bfloat16') == 2; "
        "assert zarr_layout.storage_dtype('float8_e4m3fn') == 'uint8'; "
        "print('torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ["False"], (p.stdout, p.stderr)
