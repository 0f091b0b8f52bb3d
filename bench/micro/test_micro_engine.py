"""Copy engine and CRC-32C on 16 MiB; each figure is read against ``np.copyto`` of the same bytes.

Groups (compare within a group): ``copy`` (CopyEngine 1/2 threads, with/without CRC, vs
``np.copyto``) and ``crc32c`` (native vs the Python fallback's ``google_crc32c``).
"""

from __future__ import annotations

import numpy as np
import pytest

PIECE = 4 << 20


def _copy(eng, src, dst, crc):
    s, d, n = src.ctypes.data, dst.ctypes.data, src.nbytes
    hs = [eng.submit(s + off, d + off, min(PIECE, n - off), crc=crc) for off in range(0, n, PIECE)]
    return [h.result() for h in hs]


@pytest.mark.benchmark(group="copy")
def test_numpy_copyto(benchmark, src, dst):
    benchmark(np.copyto, dst, src)
    assert np.array_equal(dst, src)


@pytest.mark.benchmark(group="copy")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("crc", [False, True], ids=["nocrc", "crc"])
def test_copy_engine(benchmark, native, src, dst, threads, crc):
    with native.CopyEngine(num_threads=threads) as eng:
        crcs = benchmark(_copy, eng, src, dst, crc)
    assert np.array_equal(dst, src)
    if crc:
        n = src.nbytes
        assert crcs == [native.crc32c(src[off : off + PIECE]) for off in range(0, n, PIECE)]


@pytest.mark.benchmark(group="crc32c")
def test_crc32c_native(benchmark, native, fallback, src):
    assert benchmark(native.crc32c, src) == fallback.crc32c(src)


@pytest.mark.benchmark(group="crc32c")
def test_crc32c_python(benchmark, fallback, src):
    assert benchmark(fallback.crc32c, src) > 0


@pytest.mark.benchmark(group="crc32c")
def test_crc32c_ptr_small(benchmark, native, src):
    """Per-call overhead: CRC of one 4 KiB page by address."""
    benchmark(native.crc32c_ptr, src.ctypes.data, 4096)
