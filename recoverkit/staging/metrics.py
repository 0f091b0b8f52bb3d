"""The metrics of one save, written through one owner.

Several threads learn something about a save: the caller (how long ``save_async`` blocked,
the eager copies), the optimizers' pre-step hooks (how long training waited), the drain
(staging done, each tier durable), the committer (commit and retention per tier) and the
superseding logic. None of them writes a shared dict: each calls one method of the save's
:class:`SaveMetrics`, which owns the values and takes its lock. Readers see a read-only
mapping (``handle.metrics["call_s"]``, ``SaveResult.timings_s``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["SaveMetrics"]


class SaveMetrics(Mapping[str, Any]):
    """What one save did and how long each part took; a read-only mapping to its readers.

    Keys: ``call_s``, ``eager_copy_s``, ``bytes``, ``prestep_wait_s`` (the lazy path),
    ``staging_s``, ``durable_s/<tier>`` (seconds from the call), ``commit/<tier>`` and
    ``retention/<tier>`` (seconds each took), ``superseded_by``, ``staged_in`` (``"shm"``:
    straight into a shared-memory slot; ``"pool"``: the staging pool).

    Example:
        >>> m = SaveMetrics()
        >>> m.waited(0.5); m.waited(0.25); m["prestep_wait_s"]
        0.75
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.perf_counter()
        self._values: dict[str, Any] = {"prestep_wait_s": 0.0, "submitted_at": self.started}

    def _put(self, **values: Any) -> None:
        with self._lock:
            self._values.update(values)

    def called(
        self, *, call_s: float, eager_copy_s: float | None = None, nbytes: int | None = None
    ) -> None:
        """The caller: the call returned after ``call_s``; the eager copies took ``eager_copy_s``."""
        extra = {} if eager_copy_s is None else {"eager_copy_s": eager_copy_s, "bytes": nbytes}
        self._put(call_s=call_s, **extra)

    def staged_in(self, where: str) -> None:
        """The stager: the save's ranges are in ``where`` (``"shm"`` or ``"pool"``)."""
        self._put(staged_in=where)

    def waited(self, seconds: float) -> None:
        """A pre-step hook (or ``before_update``): training waited ``seconds`` for copies."""
        with self._lock:
            self._values["prestep_wait_s"] += seconds

    def staged(self) -> None:
        """The drain: every byte is in host memory."""
        self._put(staging_s=time.perf_counter() - self.started)

    def committed(self, tier: str, *, commit_s: float, retention_s: float) -> None:
        """The committer: ``tier`` holds the step (its commit, then its retention, took ...)."""
        with self._lock:
            self._values[f"commit/{tier}"] = commit_s
            self._values[f"retention/{tier}"] = retention_s
            self._values[f"durable_s/{tier}"] = time.perf_counter() - self.started

    def superseded_by(self, step: int) -> None:
        """The drain: a newer save's step is written instead of this one."""
        self._put(superseded_by=step)

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            return self._values[key]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._values))

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def __repr__(self) -> str:
        with self._lock:
            return f"SaveMetrics({self._values!r})"
