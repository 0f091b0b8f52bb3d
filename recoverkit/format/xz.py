"""xz compression of metadata (pack tables, large object trees), inflated as hostile input.

What recoverkit compresses is its own metadata: highly repetitive text (tensor keys, tree
nodes) that xz at preset 0 shrinks 30-50 fold in milliseconds. Reading it back is bounded:
the output may be at most :data:`MAX_RATIO` times the compressed size plus :data:`SLACK`
(what a reader allocates stays proportional to the bytes it really read), the decoder's own
memory is capped, and truncated or trailing data is refused.

Example:
    >>> inflate(compress(b"abc" * 1000), what="x") == b"abc" * 1000
    True
"""

from __future__ import annotations

import lzma

__all__ = ["MAGIC", "MAX_RATIO", "SLACK", "compress", "inflate"]

#: the first bytes of every xz stream
MAGIC = b"\xfd7zXZ\x00"
#: inflated bytes per compressed byte, at most
MAX_RATIO = 1024
#: inflated bytes allowed beyond the ratio (small inputs)
SLACK = 64 << 10
_MEMLIMIT = 64 << 20  # the decoder's own memory: preset 0 needs about 1 MiB


def compress(raw: bytes) -> bytes:
    """``raw`` as one xz stream (preset 0, no integrity check: the caller's CRC covers it)."""
    return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=0)


def inflate(data: bytes, *, what: str) -> bytes:
    """The bytes of the xz stream ``data``, within the bounds above; ValueError naming
    ``what`` when the data is not xz, truncated, followed by other bytes or too large."""
    limit = len(data) * MAX_RATIO + SLACK
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_MEMLIMIT)
    try:
        raw = decoder.decompress(data, max_length=limit + 1)
    except lzma.LZMAError as e:
        raise ValueError(f"{what} is not valid xz data ({e})") from None
    if len(raw) > limit:
        raise ValueError(f"{what} inflates beyond {limit} bytes ({MAX_RATIO} times its size)")
    if not decoder.eof or decoder.unused_data:
        raise ValueError(f"{what}'s xz data is truncated or has trailing bytes")
    return raw
