"""Segment files: one file per rank per step, many buffers at planned offsets.

A segment holds the rank's encoded object tree (at offset 0) followed by the bytes of
every tensor shard the rank owns. Large buffers (``pack_below`` bytes and up) start on a
4 KiB boundary, so an O_DIRECT write takes them straight from (page-aligned) memory;
smaller ones are packed one after another at their natural alignment (the largest power
of two dividing their size, 64 bytes at most: never less than their dtype's), sharing
blocks, so many small tensors cost their bytes and not a block each. Readers rely only on
the offsets the manifest records. The layout is pure arithmetic; the bytes move through
the engine (``recoverkit._native``), which writes them with ``pwrite`` and ``fsync``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ALIGNMENT", "PACK_ALIGNMENT", "PACK_BELOW", "PACK_BYTES", "segment_name", "align_up", "natural_alignment", "plan_offsets"]

ALIGNMENT = 4096
#: the most a packed (small) buffer is aligned to: every dtype's itemsize divides it
PACK_ALIGNMENT = 64
#: buffers smaller than this are packed by writers that pack (``plan_offsets(pack_below=)``);
#: at this size a 4 KiB alignment wastes at most 6 %
PACK_BELOW = 64 << 10
#: small whole tensors that follow each other are grouped into packs of at most this many
#: bytes, each checked by one CRC (a read of one of them reads and verifies its pack)
PACK_BYTES = 1 << 20


def segment_name(rank: int) -> str:
    """File name of ``rank``'s segment inside a step directory.

    Example:
        >>> segment_name(3)
        'rank-00003.seg'
    """
    return f"rank-{rank:05d}.seg"


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def natural_alignment(nbytes: int) -> int:
    """Where a packed buffer of ``nbytes`` may start: the largest power of two dividing its
    size, at most :data:`PACK_ALIGNMENT` (a tensor's size is a multiple of its itemsize, a
    power of two, so this is never less than its dtype's alignment).

    Example:
        >>> [natural_alignment(n) for n in (0, 1, 12, 16, 4096)]
        [64, 1, 4, 16, 64]
    """
    return min(nbytes & -nbytes, PACK_ALIGNMENT) if nbytes else PACK_ALIGNMENT


def plan_offsets(
    sizes: Sequence[int], *, alignment: int = ALIGNMENT, pack_below: int = 0
) -> tuple[list[int], int]:
    """Place buffers of ``sizes`` bytes one after another; return the offsets and the file
    size (the end of the last buffer, unpadded).

    Buffers of ``pack_below`` bytes or more start on an ``alignment`` boundary; smaller
    ones are packed at their :func:`natural_alignment` (``pack_below=0``: every buffer is
    aligned). Empty buffers take no room (and no alignment when packing).

    Example:
        >>> plan_offsets([10, 5000, 0, 1])
        ([0, 4096, 12288, 12288], 12289)
        >>> plan_offsets([10, 16, 16, 70000, 4], pack_below=65536)
        ([0, 16, 32, 4096, 74096], 74100)
    """
    offsets: list[int] = []
    end = 0
    pos = 0
    for n in sizes:
        if n < 0:
            raise ValueError(f"buffer size must be >= 0, got {n}")
        if n >= pack_below:
            a = alignment
        else:
            a = n & -n
            if a > PACK_ALIGNMENT or a == 0:
                a = PACK_ALIGNMENT
        if n or n >= pack_below:  # an empty buffer is aligned only where everything is
            pos = (pos + a - 1) // a * a
        offsets.append(pos)
        pos += n
        end = max(end, pos)
    return offsets, end
