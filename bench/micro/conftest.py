"""Shared data for the micro-benchmarks: one random buffer, page-aligned, every page touched (``bench_limits.buffer``).

Run them with ``pytest bench/micro`` (``testpaths`` in pyproject keeps them out of the default
collection). Baselines live in ``bench/baselines``; see ``bench/README.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_limits import buffer

MIB = 1 << 20
SIZE = 16 * MIB  # big enough to leave the caches, small enough for ~1 s per benchmark


@pytest.fixture(scope="session")
def src() -> np.ndarray:
    return buffer(SIZE)  # random bytes (seed 0)


@pytest.fixture()
def dst() -> np.ndarray:
    return buffer(SIZE, fill=False)


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
