"""Shared data for the micro-benchmarks: one random buffer, page-aligned, every page touched.

Run them with ``pytest bench/micro`` (``testpaths`` in pyproject keeps them out of the default
collection). Baselines live in ``bench/baselines``; see ``bench/README.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

MIB = 1 << 20
SIZE = 16 * MIB  # big enough to leave the caches, small enough for ~1 s per benchmark


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 4096, dtype=np.uint8)
    off = (-raw.ctypes.data) % 4096
    return raw[off : off + nbytes]


@pytest.fixture(scope="session")
def src() -> np.ndarray:
    a = _aligned(SIZE)
    a[:] = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    return a


@pytest.fixture()
def dst() -> np.ndarray:
    a = _aligned(SIZE)
    a[::4096] = 0
    return a


@pytest.fixture(scope="session")
def native():
    from recoverkit._native import load

    try:
        return load("native")
    except ImportError:
        pytest.skip("native engine not built")


@pytest.fixture(scope="session")
def fallback():
    from recoverkit._native import load

    return load("python")
