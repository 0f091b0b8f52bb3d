"""Fixtures for the engine tests: `engine` runs a test once per backend (native, python)."""

from __future__ import annotations

from types import ModuleType

import pytest

from .helpers import BACKENDS, load_backend


@pytest.fixture(params=BACKENDS, scope="session")
def engine(request: pytest.FixtureRequest) -> ModuleType:
    return load_backend(request.param)


@pytest.fixture(scope="session")
def native() -> ModuleType:
    return load_backend("native")


@pytest.fixture(scope="session")
def python_engine() -> ModuleType:
    return load_backend("python")
