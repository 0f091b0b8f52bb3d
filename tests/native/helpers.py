"""Helpers shared by the engine tests."""

from __future__ import annotations

import ctypes
import os
from types import ModuleType

import numpy as np
import pytest

from recoverkit._native import load

BACKENDS = ["native", "python"]


def load_backend(name: str) -> ModuleType:
    """The engine module, or a skip when the native extension is not built (a failure
    instead when RECOVERKIT_NATIVE=1 says it must be there)."""
    try:
        return load(name)
    except ImportError as e:
        if name == "native" and os.environ.get("RECOVERKIT_NATIVE") != "1":
            pytest.skip(f"native engine not built: {e}")
        raise


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def read_at(address: int, n: int) -> bytes:
    return ctypes.string_at(address, n)
