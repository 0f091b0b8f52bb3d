"""Segment files: one file per rank per step, many buffers at aligned offsets.

A segment holds the rank's encoded object tree (at offset 0) followed by the bytes of
every tensor shard the rank owns, each starting on a 4 KiB boundary so it can be written
and read with O_DIRECT. The layout is pure arithmetic; the bytes move through the engine
(``recoverkit._native``), which writes them with ``pwrite`` and ``fsync``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ALIGNMENT", "segment_name", "align_up", "plan_offsets"]

ALIGNMENT = 4096


def segment_name(rank: int) -> str:
    """File name of ``rank``'s segment inside a step directory.

    Example:
        >>> segment_name(3)
        'rank-00003.seg'
    """
    return f"rank-{rank:05d}.seg"


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def plan_offsets(sizes: Sequence[int], *, alignment: int = ALIGNMENT) -> tuple[list[int], int]:
    """Place buffers of ``sizes`` bytes one after another at aligned offsets.

    Returns the offsets and the file size (the end of the last buffer, unpadded).

    Example:
        >>> plan_offsets([10, 5000, 0, 1])
        ([0, 4096, 12288, 12288], 12289)
    """
    offsets: list[int] = []
    end = 0
    pos = 0
    for n in sizes:
        if n < 0:
            raise ValueError(f"buffer size must be >= 0, got {n}")
        offsets.append(pos)
        end = max(end, pos + n)
        pos = align_up(pos + n, alignment)
    return offsets, end
