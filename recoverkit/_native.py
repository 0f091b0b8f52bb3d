"""Loads the copy/IO engine: the compiled ``recoverkit._C`` or the pure-Python fallback.

Everything that moves tensor bytes (staging pool, copy engine, segment files, CRC-32C)
calls an engine; both backends expose the same names, documented in ``recoverkit/_C.pyi``,
and write byte-identical files. The engine is injected: ``Checkpointer(engine=)``,
``LocalFS(engine=)`` and the checksum helpers' ``engine=`` take one, and
:func:`resolve` gives the process-wide default, ``recoverkit._native.engine``, to whoever
was given none. The default is looked up through this module when it is needed, never
copied into another module at import, so nothing holds on to it behind an injected engine.

The choice follows the environment variable ``RECOVERKIT_NATIVE``:

* ``0`` (or ``false``/``no``/``off``): the fallback, ``recoverkit._fallback``;
* ``1`` (or ``true``/``yes``/``on``): the native engine is required; ImportError without it;
* unset or empty: the native engine when it imports, else the fallback with a warning.

Example:
    >>> from recoverkit._native import engine, load
    >>> engine.crc32c(b"123456789") == 0xE3069283
    True
    >>> load("python").BACKEND
    'python'
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Any

__all__ = ["engine", "load", "resolve"]

_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


def _import_native() -> ModuleType:
    return importlib.import_module("recoverkit._C")


def _import_fallback() -> ModuleType:
    return importlib.import_module("recoverkit._fallback")


def load(backend: str | None = None) -> ModuleType:
    """Returns an engine module.

    Args:
        backend: ``"native"`` (ImportError if the extension is missing), ``"python"``, or
            None to decide from ``RECOVERKIT_NATIVE`` as described in the module docstring.
    """
    if backend == "native":
        try:
            return _import_native()
        except ImportError as e:
            raise ImportError(
                f"recoverkit's native engine (recoverkit._C) is required but cannot be imported: "
                f"{e}. Build it with `pip install -e .` (needs a C++17 compiler), or set "
                f"RECOVERKIT_NATIVE=0 to use the pure-Python engine."
            ) from e
    if backend == "python":
        return _import_fallback()
    if backend is not None:
        raise ValueError(f"backend must be 'native', 'python' or None, got {backend!r}")

    setting = os.environ.get("RECOVERKIT_NATIVE", "").strip().lower()
    if setting in _OFF:
        return load("python")
    if setting in _ON:
        return load("native")
    if setting:
        raise ValueError(
            f"RECOVERKIT_NATIVE must be 0 (pure Python), 1 (native required) or unset, "
            f"got {os.environ['RECOVERKIT_NATIVE']!r}"
        )
    try:
        return _import_native()
    except ImportError as e:
        warnings.warn(
            f"recoverkit's native engine is not available ({e}); using the slower pure-Python "
            f"engine. Set RECOVERKIT_NATIVE=0 to silence this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _import_fallback()


engine: ModuleType = load()


def resolve(given: Any = None) -> Any:
    """The engine to use: ``given``, or the process-wide default when it is None.

    Example:
        >>> fallback = load("python")
        >>> resolve(fallback) is fallback, resolve() is engine
        (True, True)
    """
    return given if given is not None else engine
