"""Segment file write (+fsync) and verified read of 16 MiB in 4 MiB items.

Group ``segment_write``: ``write_segment`` buffered and O_DIRECT vs a plain ``os.write`` +
``fsync`` of the same bytes (the disk). Group ``segment_read``: ``read_segment`` with every
item's CRC checked vs a plain ``os.preadv`` (both from the page cache).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from bench.bench_limits import plain_read, plain_write_fsync

PIECE = 4 << 20


def _items(a):
    return [(off, a.ctypes.data + off, min(PIECE, a.nbytes - off)) for off in range(0, a.nbytes, PIECE)]


@pytest.mark.benchmark(group="segment_write")
def test_plain_write_fsync(benchmark, tmp_path, src):
    path = str(tmp_path / "plain.bin")
    benchmark(plain_write_fsync, path, src)
    assert os.path.getsize(path) == src.nbytes


@pytest.mark.benchmark(group="segment_write")
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "odirect"])
def test_write_segment(benchmark, native, tmp_path, src, direct):
    path = str(tmp_path / "seg.bin")
    items = _items(src)
    benchmark(native.write_segment, path, items, direct=direct)
    assert os.path.getsize(path) == src.nbytes


@pytest.fixture()
def segment(native, tmp_path, src):
    path = str(tmp_path / "seg.bin")
    native.write_segment(path, _items(src))
    crcs = [native.crc32c_ptr(ptr, n) for _, ptr, n in _items(src)]
    return path, crcs


@pytest.mark.benchmark(group="segment_read")
def test_read_segment_verify(benchmark, native, segment, src, dst):
    path, crcs = segment
    items = [(off, ptr, n, c) for (off, ptr, n), c in zip(_items(dst), crcs)]
    assert benchmark(native.read_segment, path, items) == crcs
    assert np.array_equal(dst, src)


@pytest.mark.benchmark(group="segment_read")
def test_plain_read(benchmark, segment, src, dst):
    path, _ = segment
    benchmark(plain_read, path, dst)
    assert np.array_equal(dst, src)
