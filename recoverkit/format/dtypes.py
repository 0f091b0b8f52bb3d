"""Dtype names and raw byte views: how a tensor becomes bytes and comes back.

The manifest records a tensor's dtype by its canonical name (the ``torch.<name>`` attribute,
e.g. ``"bfloat16"``). This module is the one table of those names and their item sizes, and it
needs no torch: the format checks (``validate``, ``zarr_layout``) and the CLI's read-only
commands size regions from it without importing torch. The functions that take or return torch
objects (``dtype_name``, ``dtype_from_name``, ``to_bytes_view``, ``from_bytes``) import torch
when called; nothing here copies: a view shares the tensor's memory, so the copy engine can read
from or write into it directly.

Every dtype a tensor can be stored in is covered: bool, all signed and unsigned integers
(``uint16``/``uint32``/``uint64`` and the sub-byte ``int1``..``int7``/``uint1``..``uint7``
too, which torch stores one element per byte), all floats including ``bfloat16``, every
``float8_*`` kind and the packed ``float4_e2m1fn_x2``, all complex kinds and the ``bits*``
kinds. Quantized dtypes (``qint8`` ...) carry a scale and zero point outside the bytes and are
refused with :class:`~recoverkit.errors.EncodeError`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import EncodeError, IncompatibleCheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ITEMSIZE",
    "STORABLE_NAMES",
    "QUANTIZED_NAMES",
    "ALIASES",
    "canonical_name",
    "itemsize",
    "dtype_name",
    "dtype_from_name",
    "to_bytes_view",
    "from_bytes",
    "nbytes",
]

#: Canonical name -> bytes per stored element (torch's ``dtype.itemsize``; a test compares
#: every entry with torch's own). Sub-byte dtypes take one byte per element, as torch stores
#: them; ``float4_e2m1fn_x2`` is one byte holding two values.
ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint1": 1, "uint2": 1, "uint3": 1, "uint4": 1, "uint5": 1, "uint6": 1, "uint7": 1,
    "int1": 1, "int2": 1, "int3": 1, "int4": 1, "int5": 1, "int6": 1, "int7": 1,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bits16": 2,
}  # fmt: skip
#: Every storable canonical name (``str(dtype)`` without ``"torch."``).
STORABLE_NAMES: tuple[str, ...] = tuple(ITEMSIZE)
QUANTIZED_NAMES = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
#: Aliases accepted when reading (``torch.<alias>`` is the same dtype object).
ALIASES = {
    "float": "float32", "double": "float64", "half": "float16",
    "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32",
    "short": "int16", "int": "int32", "long": "int64", "bit": "uint1",
}  # fmt: skip


def canonical_name(name: object) -> str:
    """The canonical name a recorded dtype name stands for (aliases resolved).

    Raises:
        IncompatibleCheckpointError: not a string, unknown, or quantized.

    Example:
        >>> canonical_name("half"), canonical_name("bfloat16")
        ('float16', 'bfloat16')
    """
    if not isinstance(name, str):
        raise IncompatibleCheckpointError(f"dtype name must be a string, got {name!r}")
    canon = ALIASES.get(name, name)
    if canon not in ITEMSIZE:
        why = (
            "quantized dtypes are not supported"
            if name in QUANTIZED_NAMES
            else "no such storable dtype"
        )
        raise IncompatibleCheckpointError(f"unknown dtype {name!r} in checkpoint: {why}")
    return canon


def itemsize(name: object) -> int:
    """Bytes per element of the dtype recorded as ``name`` (no torch needed).

    Example:
        >>> itemsize("bfloat16"), itemsize("complex128")
        (2, 16)
    """
    return ITEMSIZE[canonical_name(name)]


# ------------------------------------------------------------------ torch objects (torch imported on use)
@functools.cache
def _tables() -> tuple[dict[str, torch.dtype], dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    by_name = {n: getattr(torch, n) for n in STORABLE_NAMES if hasattr(torch, n)}
    quantized = {n: getattr(torch, n) for n in QUANTIZED_NAMES if hasattr(torch, n)}
    return by_name, quantized, {d: n for n, d in by_name.items()}


def storable_by_name() -> dict[str, torch.dtype]:
    """This torch build's storable dtypes by canonical name (names it lacks are absent)."""
    return _tables()[0]


def quantized_by_name() -> dict[str, torch.dtype]:
    """This torch build's quantized dtypes by name (refused everywhere)."""
    return _tables()[1]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a storable dtype, as recorded in a manifest.

    Args:
        dtype: any storable torch dtype (aliases such as ``torch.half`` give the canonical name).

    Returns:
        The ``torch.<name>`` attribute name, e.g. ``"float16"`` for ``torch.half``.

    Raises:
        EncodeError: for quantized dtypes, or anything else that is not a storable dtype.

    Example:
        >>> import torch
        >>> dtype_name(torch.half), dtype_name(torch.float8_e4m3fn)
        ('float16', 'float8_e4m3fn')
    """
    _, quantized, name_of = _tables()
    name = name_of.get(dtype)
    if name is not None:
        return name
    if dtype in quantized.values():
        raise EncodeError(
            f"{dtype} is a quantized dtype; quantized tensors are not supported "
            "(store the int representation and the quantization parameters instead)"
        )
    raise EncodeError(f"{dtype!r} is not a storable torch dtype")


def dtype_from_name(name: str) -> torch.dtype:
    """The dtype recorded under ``name`` (inverse of :func:`dtype_name`; aliases accepted).

    Raises:
        IncompatibleCheckpointError: the name is unknown to this torch build, or quantized.

    Example:
        >>> dtype_from_name("bfloat16")
        torch.bfloat16
    """
    canon = canonical_name(name)
    dtype = _tables()[0].get(canon)
    if dtype is None:
        import torch

        raise IncompatibleCheckpointError(
            f"unknown dtype {name!r} in checkpoint: torch {torch.__version__} has no such storable dtype"
        )
    return dtype


def nbytes(t: torch.Tensor) -> int:
    """Bytes the elements of ``t`` occupy when stored contiguously.

    Example:
        >>> import torch
        >>> nbytes(torch.zeros(3, 2, dtype=torch.bfloat16))
        12
    """
    return t.numel() * t.element_size()


def to_bytes_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D ``uint8`` view of the bytes of a contiguous CPU tensor (no copy).

    0-d tensors give ``element_size()`` bytes; empty tensors give an empty view.

    Args:
        t: a contiguous CPU tensor of a storable dtype (``requires_grad`` is fine).

    Raises:
        ValueError: ``t`` is not contiguous, not on the CPU, not strided (sparse), or a lazy
            conjugate/negative view whose bytes differ from its values.
        EncodeError: ``t`` has a dtype that cannot be stored (quantized).

    Example:
        >>> import torch
        >>> to_bytes_view(torch.tensor([1.0], dtype=torch.float16)).tolist()
        [0, 60]
    """
    import torch

    if t.layout != torch.strided:
        raise ValueError(f"to_bytes_view needs a strided (dense) tensor, got layout {t.layout}")
    if t.device.type != "cpu":
        raise ValueError(f"to_bytes_view needs a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(
            f"to_bytes_view needs a contiguous tensor (shape {list(t.shape)}, stride {list(t.stride())})"
        )
    if t.is_conj() or t.is_neg():
        raise ValueError(
            "to_bytes_view got a lazy conj/neg view; call .resolve_conj().resolve_neg() first"
        )
    dtype_name(t.dtype)  # refuse quantized dtypes with a clear message
    flat = t.detach().reshape(-1)
    if t.dtype == torch.uint8:
        return flat
    try:
        return flat.view(torch.uint8)
    except RuntimeError:  # pragma: no cover - every dtype of torch 2.13 takes the path above
        return _storage_bytes(t)


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, sliced from its untyped storage (no copy)."""
    import torch

    offset = int(t.storage_offset()) * t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), offset, (nbytes(t),), (1,))


def from_bytes(buf: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Reinterpret a 1-D ``uint8`` buffer as a tensor of ``dtype`` and ``shape`` (no copy).

    The result shares memory with ``buf``: writing into it fills the buffer, which is how
    the reader lands bytes straight in their final place.

    Args:
        buf: a contiguous 1-D ``uint8`` tensor of exactly ``prod(shape) * itemsize`` bytes,
            starting at a storage offset divisible by the dtype's item size.
        dtype: the element type.
        shape: the element shape.

    Raises:
        ValueError: ``buf`` is not a 1-D contiguous uint8 tensor, has the wrong size, or
            starts at a misaligned storage offset.

    Example:
        >>> import torch
        >>> from_bytes(torch.tensor([0, 60], dtype=torch.uint8), torch.float16, ())
        tensor(1., dtype=torch.float16)
    """
    import torch

    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(
            f"from_bytes needs a contiguous 1-D uint8 tensor, got {buf.dtype} of shape {list(buf.shape)}"
        )
    shape = tuple(int(d) for d in shape)
    size = dtype.itemsize
    numel = 1
    for d in shape:
        numel *= d
    if buf.numel() != numel * size:
        raise ValueError(
            f"from_bytes: {buf.numel()} bytes cannot hold {dtype} of shape {list(shape)} "
            f"({numel * size} bytes)"
        )
    if buf.numel() == 0:  # any storage offset; not torch.empty(dtype), which bits16 lacks
        return torch.empty(0, dtype=torch.uint8, device=buf.device).view(dtype).view(shape)
    if buf.storage_offset() % size:
        raise ValueError(
            f"from_bytes: storage offset {buf.storage_offset()} is not a multiple of {dtype}'s size {size}"
        )
    return buf.view(dtype).view(shape)
