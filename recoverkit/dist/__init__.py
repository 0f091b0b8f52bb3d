"""Deprecated alias: ``recoverkit.dist`` was renamed.

Commit coordination lives in :mod:`recoverkit.distributed`; the descriptions of sharded and
DTensor state (``sharded``, ``dtensor``) in :mod:`recoverkit.state`. Importing the old names
still works and warns once.
"""

from __future__ import annotations

import importlib
import sys
import warnings

_MOVED = {
    "sharded": "recoverkit.state.sharded",
    "dtensor": "recoverkit.state.dtensor",
    "commit": "recoverkit.distributed.commit",
    "coordinator": "recoverkit.distributed.coordinator",
}

warnings.warn(
    "recoverkit.dist is deprecated: use recoverkit.distributed (commit, coordinator) and "
    "recoverkit.state (sharded, dtensor)",
    DeprecationWarning,
    stacklevel=2,
)

for _name, _target in _MOVED.items():
    _module = importlib.import_module(_target)
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
