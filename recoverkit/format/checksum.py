"""Checksums of the format: CRC-32C everywhere.

Data bytes are checksummed by the copy engine as they are staged; this module is the
single entry for everything else (manifests, object blobs, verification passes). Each helper
takes the engine to compute with (``engine=``, the one a Checkpointer was given); without
one it uses the process-wide default (:func:`recoverkit._native.resolve`).
"""

from __future__ import annotations

from typing import Any

from .. import _native

__all__ = ["crc32c", "crc32c_ptr", "hexcrc"]


def crc32c(data: Any, value: int = 0, *, engine: Any = None) -> int:
    """CRC-32C of a buffer, extending a running ``value``, computed by ``engine``.

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
        >>> from recoverkit._native import load
        >>> hex(crc32c(b"6789", crc32c(b"12345"), engine=load("python")))
        '0xe3069283'
    """
    return int(_native.resolve(engine).crc32c(data, value))


def crc32c_ptr(ptr: int, nbytes: int, value: int = 0, *, engine: Any = None) -> int:
    """CRC-32C of ``nbytes`` of raw memory at ``ptr``, computed by ``engine``."""
    return int(_native.resolve(engine).crc32c_ptr(ptr, nbytes, value))


def hexcrc(value: int) -> str:
    """The form checksums take in messages: ``0x`` and eight hex digits."""
    return f"0x{value:08x}"
