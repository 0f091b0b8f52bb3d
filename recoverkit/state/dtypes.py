"""Dtype names and raw byte views: how a tensor becomes bytes and comes back.

Sits between capture and staging in the save data flow (``flatten`` -> **bytes view** ->
staging pool / segment file) and between the reader and ``unflatten`` on restore (segment
bytes -> **typed view** -> live tensor). The manifest records a tensor's dtype by the name
``dtype_name`` gives (the ``torch.<name>`` attribute, e.g. ``"bfloat16"``), and the reader
turns it back with ``dtype_from_name``. Nothing here copies: a view shares the tensor's
memory, so the copy engine can read from or write into it directly.

Every dtype a tensor can be stored in is covered: bool, all signed and unsigned integers
(``uint16``/``uint32``/``uint64`` and the sub-byte ``int1``..``int7``/``uint1``..``uint7``
too, which torch stores one element per byte), all floats including ``bfloat16``, every
``float8_*`` kind and the packed ``float4_e2m1fn_x2``, all complex kinds and the ``bits*``
kinds. Quantized dtypes (``qint8`` ...) carry a scale and zero point outside the bytes and are
refused with :class:`~recoverkit.errors.EncodeError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import EncodeError, IncompatibleCheckpointError

__all__ = [
    "dtype_name",
    "dtype_from_name",
    "to_bytes_view",
    "from_bytes",
    "nbytes",
    "STORABLE_DTYPES",
]

# Canonical names (str(dtype) without "torch."). Names missing from an older torch are skipped.
_STORABLE_NAMES = (
    "bool",
    "uint8", "uint16", "uint32", "uint64",
    "int8", "int16", "int32", "int64",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
    "float16", "bfloat16", "float32", "float64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex32", "complex64", "complex128",
    "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
)  # fmt: skip
_QUANTIZED_NAMES = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
# Aliases accepted when reading (torch.<alias> is the same dtype object).
_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16",
    "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32",
    "short": "int16", "int": "int32", "long": "int64", "bit": "uint1",
}  # fmt: skip

_BY_NAME: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _STORABLE_NAMES if hasattr(torch, n)
}
_QUANTIZED: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _QUANTIZED_NAMES if hasattr(torch, n)
}
_NAME_OF: dict[torch.dtype, str] = {d: n for n, d in _BY_NAME.items()}

#: Every dtype this torch build can store, by canonical name.
STORABLE_DTYPES: tuple[torch.dtype, ...] = tuple(_BY_NAME.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a storable dtype, as recorded in a manifest.

    Args:
        dtype: any storable torch dtype (aliases such as ``torch.half`` give the canonical name).

    Returns:
        The ``torch.<name>`` attribute name, e.g. ``"float16"`` for ``torch.half``.

    Raises:
        EncodeError: for quantized dtypes, or anything else that is not a storable dtype.

    Example:
        >>> dtype_name(torch.half), dtype_name(torch.float8_e4m3fn)
        ('float16', 'float8_e4m3fn')
    """
    name = _NAME_OF.get(dtype)
    if name is not None:
        return name
    if dtype in _QUANTIZED.values():
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
    if not isinstance(name, str):
        raise IncompatibleCheckpointError(f"dtype name must be a string, got {name!r}")
    dtype = _BY_NAME.get(_ALIASES.get(name, name))
    if dtype is None:
        why = (
            "quantized dtypes are not supported"
            if name in _QUANTIZED_NAMES
            else (f"torch {torch.__version__} has no such storable dtype")
        )
        raise IncompatibleCheckpointError(f"unknown dtype {name!r} in checkpoint: {why}")
    return dtype


def nbytes(t: torch.Tensor) -> int:
    """Bytes the elements of ``t`` occupy when stored contiguously.

    Example:
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
        >>> to_bytes_view(torch.tensor([1.0], dtype=torch.float16)).tolist()
        [0, 60]
    """
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
        >>> from_bytes(torch.tensor([0, 60], dtype=torch.uint8), torch.float16, ())
        tensor(1., dtype=torch.float16)
    """
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(
            f"from_bytes needs a contiguous 1-D uint8 tensor, got {buf.dtype} of shape {list(buf.shape)}"
        )
    shape = tuple(int(d) for d in shape)
    itemsize = dtype.itemsize
    numel = 1
    for d in shape:
        numel *= d
    if buf.numel() != numel * itemsize:
        raise ValueError(
            f"from_bytes: {buf.numel()} bytes cannot hold {dtype} of shape {list(shape)} "
            f"({numel * itemsize} bytes)"
        )
    if buf.numel() == 0:  # any storage offset; not torch.empty(dtype), which bits16 lacks
        return torch.empty(0, dtype=torch.uint8, device=buf.device).view(dtype).view(shape)
    if buf.storage_offset() % itemsize:
        raise ValueError(
            f"from_bytes: storage offset {buf.storage_offset()} is not a multiple of {dtype}'s size {itemsize}"
        )
    return buf.view(dtype).view(shape)
