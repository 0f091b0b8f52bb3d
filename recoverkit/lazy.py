"""Public names of a package loaded on first use (PEP 562), so importing the package is cheap.

``recoverkit``, ``recoverkit.state`` and ``recoverkit.restore.export`` name many things whose
modules import torch, numpy or a format library; a lookup imports only the module that
defines the name asked for (the CLI's read commands never import torch this way).

Example:
    >>> import types
    >>> pkg = types.ModuleType("pkg")
    >>> pkg.__getattr__, pkg.__dir__ = lazy_names(vars(pkg), {"sqrt": "math"})
    >>> pkg.sqrt(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    namespace: dict[str, Any], where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of the package whose globals are
    ``namespace``: ``where`` maps each lazy name to the module (relative to the package, or
    absolute) that defines it; a name once loaded is cached in ``namespace``."""
    package = namespace.get("__name__", "")

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())) | set(where))

    return __getattr__, __dir__
