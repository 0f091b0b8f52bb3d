"""Shared by the benchmark smoke tests: where the repository is, and every number in a result."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(tree: Any) -> Iterator[float]:
    """Every int/float leaf of a JSON tree (bools excluded)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree
