"""Checksums of the format: CRC-32C everywhere.

Data bytes are checksummed by the copy engine as they are staged; this module is the
single entry for everything else (manifests, object blobs, verification passes).
"""

from __future__ import annotations

from typing import Any

from .._native import engine

__all__ = ["crc32c", "crc32c_ptr", "hexcrc"]


def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C of a buffer, extending a running ``value``.

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
    """
    return int(engine.crc32c(data, value))


def crc32c_ptr(ptr: int, nbytes: int, value: int = 0) -> int:
    """CRC-32C of ``nbytes`` of raw memory at ``ptr``."""
    return int(engine.crc32c_ptr(ptr, nbytes, value))


def hexcrc(value: int) -> str:
    """The form checksums take in messages: ``0x`` and eight hex digits."""
    return f"0x{value:08x}"
